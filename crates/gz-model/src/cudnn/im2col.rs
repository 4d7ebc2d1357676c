//! The image layers' convolution as one matrix product on CUDA (im2col + cuBLAS), instead of
//! cuDNN's channels-last kernels for few input channels.
//!
//! The 2026-11-30 device run timed cuDNN on Dieleman's image layer (3 channels, 6×6 filters,
//! 4,096 parts of 45×45 a bf16 step) at 2.4 ms forward and 1.8 ms backward-filter, about 19
//! TFLOP/s without tensor cores: 40 % of the 10.4 ms step. Unfolded into a matrix `P` (one row
//! per output position, one column per filter tap, `kernels/im2col.cu`), the layer is `Z = P Wᵀ`
//! and its filter gradient `dW = dZᵀ P`: two cuBLAS products whose inner dimension (the taps,
//! padded to a multiple of 8 for the tensor cores) is short, so their cost is `P`'s bytes
//! (1.5 GB a step for Dieleman in bf16, written once forward and once backward: about 0.7 ms
//! each at the H200's bandwidth, estimated, not measured). The image layer needs no input
//! gradient, so there is no backward-data product.
//!
//! It takes the channels-last convolutions with stride 1, at most 8 input channels (the image
//! layers, padded or not) and at most 256 padded taps, in f32, bf16 and f16: [`eligible`].
//! **Off by default** until a device run has checked and measured it ([`set_image_gemm`];
//! `GZ_IMAGE_GEMM=1` in `gz`). The kernels run on the CPU in every test run (`gz-kernel-emu`),
//! including the product itself against candle's convolution; the CUDA test
//! `cudnn::tests::cuda_image_gemm_matches_cudnn` waits for a device.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::DType;

use super::ConvParams;

static IMAGE_GEMM: AtomicBool = AtomicBool::new(false);

/// Lets the channels-last image layers run as im2col + cuBLAS products on CUDA (stride 1, at
/// most 8 input channels and 256 padded taps; off by default until a device run has measured
/// it; `GZ_IMAGE_GEMM=1` in `gz`). The same values up to the order of the f32 sums.
pub fn set_image_gemm(on: bool) {
    IMAGE_GEMM.store(on, Ordering::Relaxed);
}

/// Whether [`set_image_gemm`] is on.
pub fn image_gemm_enabled() -> bool {
    IMAGE_GEMM.load(Ordering::Relaxed)
}

/// The filter gradient by the product too (the default with [`set_image_gemm`]).
static IMAGE_GEMM_BWD_FILTER: AtomicBool = AtomicBool::new(true);

/// With [`set_image_gemm`] on, `false` leaves the image layers' filter gradient to cuDNN and
/// runs only their forward pass as the product (`GZ_IMAGE_GEMM=fwd` in `gz`). Its product is
/// the one that may not suit cuBLAS: (taps × K) outputs, 112 × 32 for Dieleman, summed over
/// 6.5 M rows, where the forward pass is rows × K over 112; a device run compares the two.
pub fn set_image_gemm_bwd_filter(on: bool) {
    IMAGE_GEMM_BWD_FILTER.store(on, Ordering::Relaxed);
}

/// Whether [`set_image_gemm_bwd_filter`] is on.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code, reason = "used by the CUDA backend"))]
fn bwd_filter_by_product() -> bool {
    IMAGE_GEMM_BWD_FILTER.load(Ordering::Relaxed)
}

/// Columns of the unfolded matrix for `taps` filter taps (R·S·C): the next multiple of 8, so
/// that cuBLAS can take its tensor-core kernels (16-byte rows in bf16).
pub(crate) fn cols_for(taps: usize) -> usize {
    taps.next_multiple_of(8)
}

/// Whether a convolution of `x` (N, C, H, W) by `w` (K, C, R, S) (logical dims, whatever the
/// layout) takes the product: [`set_image_gemm`] on, channels-last, stride 1, at most 8 input
/// channels (the filter's the same), no empty dimension, at most 256 padded taps, f32/bf16/f16,
/// and the unfolded image and the output within 2^31 elements (cuBLAS's 32-bit sizes).
#[cfg_attr(not(feature = "cudnn"), allow(dead_code, reason = "used by the CUDA backend"))]
pub(crate) fn eligible(p: ConvParams, x: [usize; 4], w: [usize; 4], dtype: DType) -> bool {
    image_gemm_enabled() && fits(p, x, w, dtype)
}

/// [`eligible`] without the switch.
fn fits(p: ConvParams, x: [usize; 4], w: [usize; 4], dtype: DType) -> bool {
    let [n, c, h, wd] = x;
    let [k, wc, r, s] = w;
    if !(p.nhwc && p.stride == 1 && c <= 8 && wc == c) {
        return false;
    }
    if [n, c, k, r, s].contains(&0) {
        return false;
    }
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return false;
    }
    if h + 2 * p.padding < r || wd + 2 * p.padding < s {
        return false;
    }
    let rows = n * p.out_dim(h, r) * p.out_dim(wd, s);
    let cols = cols_for(r * s * c);
    // every size and element count within cuBLAS's and the kernels' 32-bit values
    cols <= 256 && rows <= i32::MAX as usize && rows.saturating_mul(k.max(cols)) <= i32::MAX as usize
}

/// Launch geometry of `kernels/im2col.cu` (shared with the emulator tests).
#[cfg_attr(
    not(any(test, feature = "cudnn")),
    allow(dead_code, reason = "used by the CUDA launchers and the emulator tests")
)]
pub(crate) mod grid {
    /// Threads per block (8 warps; `im2col_nhwc` gives each warp a row at a time).
    pub(crate) const THREADS: u32 = 256;

    /// `im2col_nhwc`: a block per 8 rows, at most 8,192 blocks (grid-stride beyond).
    pub(crate) fn im2col(rows: u32) -> (u32, u32, u32) {
        (rows.div_ceil(THREADS / 32).clamp(1, 8192), 1, 1)
    }

    /// `copy_cols`: grid-stride over `total` values, about 4 a thread.
    pub(crate) fn copy(total: u32) -> (u32, u32, u32) {
        (total.div_ceil(THREADS * 4).clamp(1, 1 << 16), 1, 1)
    }
}

#[cfg(feature = "cudnn")]
pub(super) mod cuda {
    //! Launches of `kernels/im2col.cu` and the two cuBLAS products.

    use candle_core::backend::BackendStorage;
    use candle_core::cuda::CudaDType;
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, WithDType};
    use cudarc::cublas::{sys::cublasOperation_t as Op, CudaBlas, Gemm, GemmConfig};
    use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};

    use super::super::ConvParams;
    use super::{cols_for, grid};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/im2col.ptx"));
    const MODULE: &str = "gz_im2col";

    fn err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Cuda(format!("image GEMM {what}: {e:?}").into())
    }

    fn suffix(dtype: DType) -> Result<&'static str> {
        Ok(match dtype {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            other => candle_core::bail!("image GEMM supports f32, bf16 and f16, not {other:?}"),
        })
    }

    fn u32_of(v: usize, what: &str) -> Result<u32> {
        u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("image GEMM: {what} {v} exceeds 32 bits")))
    }

    fn i32_of(v: usize, what: &str) -> Result<i32> {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("image GEMM: {what} {v} exceeds cuBLAS's sizes")))
    }

    fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("image GEMM: input is not contiguous");
        };
        let slice = s.as_cuda_slice::<T>()?;
        if b > slice.len() {
            candle_core::bail!("image GEMM: view {a}..{b} exceeds storage of {}", slice.len());
        }
        Ok(slice.slice(a..b))
    }

    /// The geometry of one eligible convolution (logical NCHW / KCRS dims).
    #[derive(Clone, Copy)]
    struct Geo {
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        k: usize,
        r: usize,
        s: usize,
        oh: usize,
        ow: usize,
        pad: usize,
    }

    impl Geo {
        fn new(p: ConvParams, x: [usize; 4], wd: [usize; 4]) -> Self {
            let [n, c, h, w] = x;
            let [k, _, r, s] = wd;
            Geo {
                n,
                c,
                h,
                w,
                k,
                r,
                s,
                oh: p.out_dim(h, r),
                ow: p.out_dim(w, s),
                pad: p.padding,
            }
        }
        fn rows(&self) -> usize {
            self.n * self.oh * self.ow
        }
        fn taps(&self) -> usize {
            self.r * self.s * self.c
        }
    }

    /// P = im2col(x): rows × cols, written whole by the kernel.
    fn im2col<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        x: &CudaView<'_, T>,
        g: Geo,
    ) -> Result<CudaSlice<T>> {
        let cols = cols_for(g.taps());
        let rows = u32_of(g.rows(), "rows")?;
        // SAFETY: the kernel writes every element of P (each row's `cols` columns).
        let mut p = unsafe { dev.alloc::<T>(g.rows() * cols) }?;
        let (n, c, h, w) = (
            u32_of(g.n, "batch")?,
            u32_of(g.c, "channels")?,
            u32_of(g.h, "height")?,
            u32_of(g.w, "width")?,
        );
        let (r, s, pad) = (
            u32_of(g.r, "filter")?,
            u32_of(g.s, "filter")?,
            u32_of(g.pad, "padding")?,
        );
        let (oh, ow, cols32) = (
            u32_of(g.oh, "height")?,
            u32_of(g.ow, "width")?,
            u32_of(cols, "columns")?,
        );
        let func = dev.get_or_load_custom_func(&format!("im2col_nhwc_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: grid::im2col(rows),
            block_dim: (grid::THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = func.builder();
        launch
            .arg(x)
            .arg(&mut p)
            .arg(&n)
            .arg(&h)
            .arg(&w)
            .arg(&c)
            .arg(&r)
            .arg(&s)
            .arg(&pad)
            .arg(&oh)
            .arg(&ow)
            .arg(&cols32);
        // SAFETY: argument types and count match `im2col_nhwc_*`; x holds n·h·w·c values, P
        // rows·cols; cols ≤ 256, the kernel's shared tables (checked by `eligible`).
        unsafe { launch.launch(cfg) }.map_err(|e| err("im2col launch", e))?;
        Ok(p)
    }

    /// dst = src (rows × src_w) with its columns cut or zero-filled to dst_w.
    fn copy_cols<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        src: &CudaView<'_, T>,
        rows: usize,
        src_w: usize,
        dst_w: usize,
    ) -> Result<CudaSlice<T>> {
        let total = u32_of(rows * dst_w, "size")?;
        let (rows32, sw, dw) = (u32_of(rows, "rows")?, u32_of(src_w, "width")?, u32_of(dst_w, "width")?);
        // SAFETY: the kernel writes every element of dst (grid-stride over rows·dst_w).
        let mut dst = unsafe { dev.alloc::<T>(rows * dst_w) }?;
        let func = dev.get_or_load_custom_func(&format!("copy_cols_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: grid::copy(total),
            block_dim: (grid::THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = func.builder();
        launch.arg(src).arg(&mut dst).arg(&rows32).arg(&sw).arg(&dw);
        // SAFETY: argument types and count match `copy_cols_*`; src holds rows·src_w values,
        // dst rows·dst_w.
        unsafe { launch.launch(cfg) }.map_err(|e| err("copy launch", e))?;
        Ok(dst)
    }

    /// One cuBLAS product `c = op_a(a) · op_b(b)` (column-major, alpha 1, beta 0) of
    /// `(m, n, k)` with leading dimensions `(lda, ldb, ldc)`; `what` names it in errors.
    #[allow(clippy::too_many_arguments, reason = "cuBLAS's own argument list")]
    fn gemm<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        what: &str,
        (op_a, op_b): (Op, Op),
        (m, n, k): (usize, usize, usize),
        (lda, ldb, ldc): (usize, usize, usize),
        a: &impl cudarc::driver::DevicePtr<T>,
        b: &impl cudarc::driver::DevicePtr<T>,
        c: &mut CudaSlice<T>,
    ) -> Result<()>
    where
        CudaBlas: Gemm<T>,
    {
        let cfg = GemmConfig {
            transa: op_a,
            transb: op_b,
            m: i32_of(m, "size")?,
            n: i32_of(n, "size")?,
            k: i32_of(k, "size")?,
            alpha: T::from_f64(1.0),
            lda: i32_of(lda, "leading dimension")?,
            ldb: i32_of(ldb, "leading dimension")?,
            beta: T::from_f64(0.0),
            ldc: i32_of(ldc, "leading dimension")?,
        };
        // SAFETY: the callers pass buffers holding what (m, n, k) and the leading dimensions say.
        unsafe { dev.cublas_handle().gemm(cfg, a, b, c) }.map_err(|e| err(what, e))
    }

    /// The forward product for one dtype: Z (rows × K, channels-last) = P · Wpᵀ.
    fn fwd<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        g: Geo,
    ) -> Result<CudaStorage>
    where
        CudaBlas: Gemm<T>,
    {
        let (taps, cols) = (g.taps(), cols_for(g.taps()));
        let p = im2col(dev, x, g)?;
        // SAFETY: the product writes all rows·K values (beta = 0).
        let mut z = unsafe { dev.alloc::<T>(g.rows() * g.k) }?;
        // column-major: Zᵀ (K × rows) = op_T(Wp stored cols × K) · op_N(P stored cols × rows);
        // Wp holds K·cols values, P rows·cols, Z rows·K
        // the filter zero-padded to K × cols, unless its taps need no padding
        let padded;
        let wp = if cols == taps {
            w.slice(..)
        } else {
            padded = copy_cols(dev, w, g.k, taps, cols)?;
            padded.slice(..)
        };
        let ops = (Op::CUBLAS_OP_T, Op::CUBLAS_OP_N);
        gemm(
            dev,
            "forward product",
            ops,
            (g.k, g.rows(), cols),
            (cols, cols, g.k),
            &wp,
            &p,
            &mut z,
        )?;
        Ok(CudaStorage::wrap_cuda_slice(z, dev.clone()))
    }

    /// The filter-gradient product for one dtype: dW (K × R·S·C, channels-last) = dZᵀ · P.
    fn bwd_filter<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        x: &CudaView<'_, T>,
        dz: &CudaView<'_, T>,
        g: Geo,
    ) -> Result<CudaStorage>
    where
        CudaBlas: Gemm<T>,
    {
        let (taps, cols) = (g.taps(), cols_for(g.taps()));
        let p = im2col(dev, x, g)?;
        // SAFETY: the product writes all K·cols values (beta = 0).
        let mut dwp = unsafe { dev.alloc::<T>(g.k * cols) }?;
        // column-major: dWpᵀ (cols × K) = op_N(P stored cols × rows) · op_T(dZ stored K × rows);
        // P holds rows·cols values, dZ rows·K, dWp K·cols
        let (ops, dims) = ((Op::CUBLAS_OP_N, Op::CUBLAS_OP_T), (cols, g.k, g.rows()));
        gemm(
            dev,
            "filter-gradient product",
            ops,
            dims,
            (cols, g.k, cols),
            &p,
            dz,
            &mut dwp,
        )?;
        if cols == taps {
            return Ok(CudaStorage::wrap_cuda_slice(dwp, dev.clone()));
        }
        let dw = copy_cols(dev, &dwp.slice(..), g.k, cols, taps)?;
        Ok(CudaStorage::wrap_cuda_slice(dw, dev.clone()))
    }

    /// The forward convolution (no bias) through the product when [`super::eligible`]; `None`
    /// leaves it to cuDNN.
    pub(in super::super) fn try_conv_fwd(
        p: ConvParams,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<Option<CudaStorage>> {
        let (x, w) = (
            super::super::nchw_dims(xl.shape(), p.nhwc)?,
            super::super::nchw_dims(wl.shape(), p.nhwc)?,
        );
        let (x, w) = ([x.0, x.1, x.2, x.3], [w.0, w.1, w.2, w.3]);
        if !super::eligible(p, x, w, xs.dtype()) {
            return Ok(None);
        }
        let g = Geo::new(p, x, w);
        let dev = xs.device().clone();
        super::super::backend::time_conv(&dev, true, || {
            Ok(Some(match xs.dtype() {
                DType::F32 => fwd::<f32>(&dev, &view(xs, xl)?, &view(ws, wl)?, g)?,
                DType::BF16 => fwd::<half::bf16>(&dev, &view(xs, xl)?, &view(ws, wl)?, g)?,
                DType::F16 => fwd::<half::f16>(&dev, &view(xs, xl)?, &view(ws, wl)?, g)?,
                _ => return Ok(None),
            }))
        })
    }

    /// The filter gradient through the product when [`super::eligible`]; `None` leaves it to
    /// cuDNN.
    pub(in super::super) fn try_conv_bwd_filter(
        p: ConvParams,
        xs: &CudaStorage,
        xl: &Layout,
        dys: &CudaStorage,
        dyl: &Layout,
        dw_shape: &Shape,
    ) -> Result<Option<CudaStorage>> {
        let x = super::super::nchw_dims(xl.shape(), p.nhwc)?;
        let w = super::super::nchw_dims(dw_shape, p.nhwc)?;
        let (x, w) = ([x.0, x.1, x.2, x.3], [w.0, w.1, w.2, w.3]);
        if !super::eligible(p, x, w, xs.dtype()) || !super::bwd_filter_by_product() {
            return Ok(None);
        }
        let g = Geo::new(p, x, w);
        if dyl.dims() != [g.n, g.oh, g.ow, g.k] {
            candle_core::bail!(
                "image GEMM backward filter: dy {:?} does not match x {x:?} and w {w:?}",
                dyl.dims()
            );
        }
        let dev = xs.device().clone();
        super::super::backend::time_conv(&dev, false, || {
            Ok(Some(match xs.dtype() {
                DType::F32 => bwd_filter::<f32>(&dev, &view(xs, xl)?, &view(dys, dyl)?, g)?,
                DType::BF16 => bwd_filter::<half::bf16>(&dev, &view(xs, xl)?, &view(dys, dyl)?, g)?,
                DType::F16 => bwd_filter::<half::f16>(&dev, &view(xs, xl)?, &view(dys, dyl)?, g)?,
                _ => return Ok(None),
            }))
        })
    }
}

#[cfg(test)]
mod emu_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// Which convolutions take the product: the nets' image layers do; strided, NCHW, wide
    /// inputs, mismatched filters, empty dimensions, f64 and sizes past 2^31 do not.
    #[test]
    fn the_image_layers_fit_and_the_rest_do_not() {
        let nhwc = |padding, stride| ConvParams {
            padding,
            stride,
            nhwc: true,
        };
        let bf = DType::BF16;
        // VGG16-blog's image layer (unpadded and padded), Dieleman's, batch 256
        assert!(fits(nhwc(1, 1), [256, 3, 106, 106], [64, 3, 3, 3], bf));
        assert!(fits(nhwc(1, 1), [256, 8, 106, 106], [64, 8, 3, 3], bf));
        assert!(fits(nhwc(0, 1), [4096, 3, 45, 45], [32, 3, 6, 6], bf));
        assert!(fits(nhwc(0, 1), [4096, 3, 45, 45], [32, 3, 6, 6], DType::F32));
        // not: NCHW, stride 2, 16 input channels, a filter of other channels, f64
        assert!(!fits(
            ConvParams {
                padding: 1,
                stride: 1,
                nhwc: false
            },
            [2, 3, 9, 9],
            [4, 3, 3, 3],
            bf
        ));
        assert!(!fits(nhwc(1, 2), [2, 3, 9, 9], [4, 3, 3, 3], bf));
        assert!(!fits(nhwc(1, 1), [2, 16, 9, 9], [4, 16, 3, 3], bf));
        assert!(!fits(nhwc(1, 1), [2, 3, 9, 9], [4, 2, 3, 3], bf));
        assert!(!fits(nhwc(1, 1), [2, 3, 9, 9], [4, 3, 3, 3], DType::F64));
        // not: an empty dimension, a filter larger than the padded image, more than 256 taps
        assert!(!fits(nhwc(1, 1), [0, 3, 9, 9], [4, 3, 3, 3], bf));
        assert!(!fits(nhwc(0, 1), [2, 3, 4, 4], [4, 3, 5, 5], bf));
        assert!(!fits(nhwc(0, 1), [2, 8, 45, 45], [4, 8, 6, 6], bf));
        // not: an unfolded image past 2^31 elements (Dieleman's at 32,768 galaxies: 2^34)
        assert!(!fits(nhwc(0, 1), [32768 * 16, 3, 45, 45], [32, 3, 6, 6], bf));
        assert_eq!((cols_for(27), cols_for(108), cols_for(72)), (32, 112, 72));
    }
}
