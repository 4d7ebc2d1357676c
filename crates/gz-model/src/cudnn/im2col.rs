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
//! The filter gradient's product has few outputs (taps × K: 112 × 32 for Dieleman) summed over
//! many rows (6.5 M), a shape a GEMM library may give a handful of thread blocks. By default it
//! runs in parts of about [`SPLIT_ROWS`] rows (one strided-batched cuBLAS call writing an f32
//! partial sum a part, bf16 or f16 inputs with an f32 output, then the `sum_parts` kernel adding
//! them in a fixed order in f32 and cutting the padded columns: [`bwd_filter_plan`]), so every
//! part has its blocks and no part's sum is rounded before the total; [`set_image_gemm_split`]
//! `(false)` (`GZ_IMAGE_GEMM=cublas`) leaves it to cuBLAS as one product. The products'
//! dimensions, leading dimensions, strides and offsets are checked on the CPU against a
//! plain-loop twin of cuBLAS's definition (`the_products_compute_the_layer_and_its_filter_gradient`).
//!
//! A tower with a backward pass ([`super::tower`]) runs each layer's forward pass inside
//! [`keeping_unfolded`]: the image layer's forward product keeps `P`, the tower holds it beside
//! the layer's input, and the layer's filter gradient runs inside [`offering_unfolded`], whose
//! product takes it instead of unfolding the image again. Nothing is kept anywhere else, so an
//! evaluation's `P` goes with its graph.
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

/// The filter gradient's product in parts (the default with [`set_image_gemm`]).
static IMAGE_GEMM_SPLIT: AtomicBool = AtomicBool::new(true);

/// With the filter gradient by the product ([`set_image_gemm_bwd_filter`]), `true` (the
/// default) cuts its rows into parts of about [`SPLIT_ROWS`], one product a part in one
/// strided-batched cuBLAS call with f32 sums, then adds them in f32 (`sum_parts`); `false` leaves
/// the whole (taps × K outputs over every row: 112 × 32 over 6.5 M rows for Dieleman) to one
/// product and to cuBLAS's own choice of kernel, which may give so few outputs a handful of
/// thread blocks (`GZ_IMAGE_GEMM=cublas` in `gz`; a device run compares the two).
pub fn set_image_gemm_split(on: bool) {
    IMAGE_GEMM_SPLIT.store(on, Ordering::Relaxed);
}

/// Whether [`set_image_gemm_split`] is on.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code, reason = "used by the CUDA backend"))]
fn split_products() -> bool {
    IMAGE_GEMM_SPLIT.load(Ordering::Relaxed)
}

/// An image layer's unfolded image `P`, kept from its forward product for its filter
/// gradient's product ([`keeping_unfolded`], [`offering_unfolded`]). Empty without the `cudnn`
/// feature.
pub(crate) struct Unfolded {
    #[cfg(feature = "cudnn")]
    kept: cuda::Kept,
}

/// Runs `f`, one layer's forward pass in a tower that will run its backward pass, and returns
/// the unfolded image its forward product kept, if it ran as one ([`eligible`] and the filter
/// gradient by the product too): the tower keeps it beside the layer's input and offers it to
/// the layer's filter gradient ([`offering_unfolded`]), which then does not unfold the image a
/// second time (for Dieleman at batch 256 in bf16: 1.5 GB, about 0.3 ms at the H200's
/// bandwidth, estimated). Nothing is kept outside this call. Without the `cudnn` feature,
/// `(f(), None)`.
pub(crate) fn keeping_unfolded<R>(f: impl FnOnce() -> R) -> (R, Option<Unfolded>) {
    #[cfg(feature = "cudnn")]
    {
        let (r, kept) = cuda::keeping(f);
        (r, kept.map(|kept| Unfolded { kept }))
    }
    #[cfg(not(feature = "cudnn"))]
    {
        (f(), None)
    }
}

/// Runs `f`, the filter gradient of the layer whose forward pass kept `kept`, offering it to
/// the product: taken only for the same input buffer, shape and dtype it was unfolded from;
/// dropped at the end of the call whether taken or not.
pub(crate) fn offering_unfolded<R>(kept: Option<Unfolded>, f: impl FnOnce() -> R) -> R {
    #[cfg(feature = "cudnn")]
    {
        cuda::offering(kept.map(|u| u.kept), f)
    }
    #[cfg(not(feature = "cudnn"))]
    {
        let _ = kept;
        f()
    }
}

/// Rows of the unfolded image per part of the filter gradient's split product (about 4.7 MB of
/// bf16 `P` and `dZ` a part for Dieleman's image layer: 400 parts, three waves of thread blocks
/// on an H200).
#[cfg_attr(
    not(feature = "cudnn"),
    allow(dead_code, reason = "used by the CUDA backend and the tests")
)]
pub(crate) const SPLIT_ROWS: usize = 16_384;

/// At most this many parts (the partial sums take parts × K × cols values).
#[cfg_attr(
    not(feature = "cudnn"),
    allow(dead_code, reason = "used by the CUDA backend and the tests")
)]
const MAX_PARTS: usize = 512;

/// One cuBLAS product as data: column-major `C = op(A) · op(B)` (`trans`: whether each of A and
/// B is transposed), alpha 1, beta 0, `batch` times `strides` apart (one strided-batched call),
/// starting `offsets` elements into the three buffers. The CUDA launcher runs these; the tests
/// run them through a plain-loop twin of cuBLAS's definition, which is how the leading
/// dimensions, strides and offsets are checked without a GPU.
#[cfg_attr(
    not(feature = "cudnn"),
    allow(dead_code, reason = "used by the CUDA backend and the tests")
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Product {
    pub(crate) trans: (bool, bool),
    pub(crate) mnk: (usize, usize, usize),
    pub(crate) ld: (usize, usize, usize),
    pub(crate) offsets: (usize, usize, usize),
    pub(crate) batch: usize,
    pub(crate) strides: (usize, usize, usize),
}

#[cfg_attr(
    not(feature = "cudnn"),
    allow(dead_code, reason = "used by the CUDA backend and the tests")
)]
impl Product {
    fn single(trans: (bool, bool), mnk: (usize, usize, usize), ld: (usize, usize, usize)) -> Self {
        Product {
            trans,
            mnk,
            ld,
            offsets: (0, 0, 0),
            batch: 1,
            strides: (0, 0, 0),
        }
    }

    /// How many elements of A, B and C (from each buffer's start) the product reads or writes:
    /// the launcher refuses buffers shorter than this.
    pub(crate) fn extents(&self) -> (usize, usize, usize) {
        let (m, n, k) = self.mnk;
        let (lda, ldb, ldc) = self.ld;
        // a column-major (rows × cols) matrix with leading dimension ld spans ld·(cols − 1) + rows
        let span = |rows: usize, cols: usize, ld: usize| ld * (cols - 1) + rows;
        let a = if self.trans.0 { span(k, m, lda) } else { span(m, k, lda) };
        let b = if self.trans.1 { span(n, k, ldb) } else { span(k, n, ldb) };
        let c = span(m, n, ldc);
        let last = self.batch - 1;
        (
            self.offsets.0 + last * self.strides.0 + a,
            self.offsets.1 + last * self.strides.1 + b,
            self.offsets.2 + last * self.strides.2 + c,
        )
    }
}

/// The forward product of a layer with `rows` output positions, `k` filters and `cols` padded
/// taps: A = the filter (K × cols, row-major, zero-padded), B = P (rows × cols, row-major),
/// C = Z (rows × K, channels-last): column-major Zᵀ (K × rows) = op_T(Wp) · op_N(P).
#[cfg_attr(
    not(feature = "cudnn"),
    allow(dead_code, reason = "used by the CUDA backend and the tests")
)]
pub(crate) fn fwd_product(rows: usize, k: usize, cols: usize) -> Product {
    Product::single((true, false), (k, rows, cols), (cols, cols, k))
}

/// How the filter gradient dWp (K × cols, row-major) = dZᵀ · P is computed.
#[cfg_attr(
    not(feature = "cudnn"),
    allow(dead_code, reason = "used by the CUDA backend and the tests")
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BwdFilterPlan {
    /// One product: A = P, B = dZ, C = dWp (column-major dWpᵀ (cols × K) = op_N(P) · op_T(dZ)).
    One(Product),
    /// `parts` (A = P, B = dZ, C = the partial sums in f32: `slots` of K × cols each, one per
    /// part of the rows) and `rest` (the last, shorter part, when the rows do not divide
    /// evenly); then `sum_parts` (`kernels/im2col.cu`) adds the slots into dW, in f32.
    Split {
        slots: usize,
        parts: Product,
        rest: Option<Product>,
    },
}

/// The filter gradient's products for `rows` output positions, `k` filters and `cols` padded
/// taps: in parts of about `part_rows` rows, or one product when `part_rows` is `None` or the
/// rows make fewer than two parts.
#[cfg_attr(
    not(feature = "cudnn"),
    allow(dead_code, reason = "used by the CUDA backend and the tests")
)]
pub(crate) fn bwd_filter_plan(rows: usize, k: usize, cols: usize, part_rows: Option<usize>) -> BwdFilterPlan {
    // the rows from `first` on, `r` of them, into the output at `out`
    let product = |r: usize, first: usize, out: usize| Product {
        offsets: (first * cols, first * k, out),
        ..Product::single((false, true), (cols, k, r), (cols, k, cols))
    };
    let parts = part_rows.map_or(1, |p| rows.div_ceil(p.max(1)).clamp(1, MAX_PARTS));
    if parts < 2 {
        return BwdFilterPlan::One(product(rows, 0, 0));
    }
    let chunk = rows.div_ceil(parts);
    let (full, rest_rows, out) = (rows / chunk, rows % chunk, k * cols);
    let slots = full + usize::from(rest_rows > 0);
    BwdFilterPlan::Split {
        slots,
        parts: Product {
            batch: full,
            strides: (chunk * cols, chunk * k, out),
            ..product(chunk, 0, 0)
        },
        rest: (rest_rows > 0).then(|| product(rest_rows, full * chunk, full * out)),
    }
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

    /// `sum_parts`: a block per 32 outputs (at most 4,096 blocks, grid-stride beyond).
    pub(crate) fn sum_parts(outs: u32) -> (u32, u32, u32) {
        (outs.div_ceil(32).clamp(1, 4096), 1, 1)
    }
}

#[cfg(feature = "cudnn")]
pub(super) mod cuda {
    //! Launches of `kernels/im2col.cu` and the two cuBLAS products.

    use candle_core::backend::BackendStorage;
    use candle_core::cuda::CudaDType;
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, WithDType};
    use cudarc::cublas::{sys::cublasOperation_t as Op, CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
    use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};

    use std::cell::{Cell, RefCell};

    use cudarc::driver::{DevicePtr, DevicePtrMut};

    use super::super::ConvParams;
    use super::{cols_for, grid, BwdFilterPlan, Product};

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
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

    /// What identifies a kept `P`: the input buffer it was unfolded from (device address and
    /// length: the tower keeps that input alive until its backward pass), its dtype and the
    /// layer's geometry.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Key {
        ptr: u64,
        len: usize,
        dtype: DType,
        geo: Geo,
    }

    /// A kept `P` and what it was unfolded from.
    pub(in super::super) struct Kept {
        key: Key,
        p: CudaStorage,
    }

    thread_local! {
        /// Whether forward products keep `P` (inside [`keeping`] only).
        static KEEP: Cell<bool> = const { Cell::new(false) };
        /// The `P` a forward product kept inside [`keeping`], or the one [`offering`] offers to
        /// a filter gradient's product; empty outside those two calls.
        static SLOT: RefCell<Option<Kept>> = const { RefCell::new(None) };
    }

    /// Puts KEEP and SLOT back as they were when dropped, `f` returning or panicking (a caught
    /// panic must not leave this thread keeping).
    struct Restore {
        keep: bool,
        slot: Option<Option<Kept>>,
    }

    impl Drop for Restore {
        fn drop(&mut self) {
            KEEP.with(|k| k.set(self.keep));
            if let Some(before) = self.slot.take() {
                drop(SLOT.with(|s| s.replace(before)));
            }
        }
    }

    /// [`super::keeping_unfolded`].
    pub(in super::super) fn keeping<R>(f: impl FnOnce() -> R) -> (R, Option<Kept>) {
        let mut restore = Restore {
            keep: KEEP.with(|k| k.replace(true)),
            slot: Some(SLOT.with(|s| s.take())),
        };
        let r = f();
        // what this call's forward product kept, the slot put back as it was
        let kept = SLOT.with(|s| s.replace(restore.slot.take().flatten()));
        drop(restore);
        (r, kept)
    }

    /// [`super::offering_unfolded`].
    pub(in super::super) fn offering<R>(kept: Option<Kept>, f: impl FnOnce() -> R) -> R {
        let restore = Restore {
            keep: KEEP.with(Cell::get),
            slot: Some(SLOT.with(|s| s.replace(kept))),
        };
        let r = f();
        // what was not taken goes now
        drop(restore);
        r
    }

    /// Whether nothing is kept on this thread (for the tests: nothing outlives the two calls).
    #[cfg_attr(not(test), allow(dead_code, reason = "read by the CUDA tests"))]
    pub(in super::super) fn nothing_kept() -> bool {
        SLOT.with(|s| s.borrow().is_none())
    }

    fn key_of<T: CudaDType + DeviceRepr + WithDType>(dev: &CudaDevice, x: &CudaView<'_, T>, g: Geo) -> Key {
        let stream = dev.cuda_stream();
        let (ptr, _record) = x.device_ptr(&stream);
        Key {
            ptr,
            len: x.len(),
            dtype: T::DTYPE,
            geo: g,
        }
    }

    /// How many filter-gradient products took a kept `P` (for the tests).
    static REUSED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// [`REUSED`]'s count so far.
    #[cfg_attr(not(test), allow(dead_code, reason = "read by the CUDA tests"))]
    pub(in super::super) fn kept_reuses() -> usize {
        REUSED.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes the offered `P` of `key`, if that is what is offered; anything else stays.
    fn take_kept(key: Key) -> Option<CudaStorage> {
        let p = SLOT.with(|s| {
            let mut s = s.borrow_mut();
            match &*s {
                Some(kept) if kept.key == key => s.take().map(|kept| kept.p),
                _ => None,
            }
        });
        if p.is_some() {
            REUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        p
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

    /// Refuses buffers of `lens` values shorter than the product's extents: cuBLAS itself does
    /// not check.
    fn check_extents(what: &str, pr: &Product, lens: (usize, usize, usize)) -> Result<()> {
        let need = pr.extents();
        if lens.0 < need.0 || lens.1 < need.1 || lens.2 < need.2 {
            candle_core::bail!("image GEMM {what}: buffers of {lens:?} values, the product needs {need:?}");
        }
        Ok(())
    }

    /// Runs `pr` (see [`super::Product`]) on `a`, `b` and `c`, each from its start (the
    /// product's offsets are applied here); `what` names it in errors. Refuses buffers shorter
    /// than the product's extents: cuBLAS itself does not check.
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        what: &str,
        pr: &Product,
        a: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        c: &mut CudaViewMut<'_, T>,
    ) -> Result<()>
    where
        CudaBlas: Gemm<T>,
    {
        check_extents(what, pr, (a.len(), b.len(), c.len()))?;
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        let (m, n, k) = pr.mnk;
        let (lda, ldb, ldc) = pr.ld;
        let gemm = GemmConfig {
            transa: op(pr.trans.0),
            transb: op(pr.trans.1),
            m: i32_of(m, "size")?,
            n: i32_of(n, "size")?,
            k: i32_of(k, "size")?,
            alpha: T::from_f64(1.0),
            lda: i32_of(lda, "leading dimension")?,
            ldb: i32_of(ldb, "leading dimension")?,
            beta: T::from_f64(0.0),
            ldc: i32_of(ldc, "leading dimension")?,
        };
        let (a, b) = (a.slice(pr.offsets.0..), b.slice(pr.offsets.1..));
        let mut c = c.slice_mut(pr.offsets.2..);
        let blas = dev.cublas_handle();
        // SAFETY: the three buffers hold the product's extents (checked above).
        let r = if pr.batch == 1 {
            unsafe { blas.gemm(gemm, &a, &b, &mut c) }
        } else {
            let stride = |v: usize| i64::try_from(v).map_err(|_| err(what, "stride past 2^63"));
            let cfg = StridedBatchedConfig {
                gemm,
                batch_size: i32_of(pr.batch, "batch")?,
                stride_a: stride(pr.strides.0)?,
                stride_b: stride(pr.strides.1)?,
                stride_c: stride(pr.strides.2)?,
            };
            unsafe { blas.gemm_strided_batched(cfg, &a, &b, &mut c) }
        };
        r.map_err(|e| err(what, e))
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
        // the filter zero-padded to K × cols, unless its taps need no padding
        let padded;
        let wp = if cols == taps {
            w.slice(..)
        } else {
            padded = copy_cols(dev, w, g.k, taps, cols)?;
            padded.slice(..)
        };
        let pr = super::fwd_product(g.rows(), g.k, cols);
        run(dev, "forward product", &pr, &wp, &p.slice(..), &mut z.slice_mut(..))?;
        // inside `keeping`: P goes to the tower, for this layer's filter gradient
        if KEEP.with(Cell::get) && super::bwd_filter_by_product() {
            let kept = Kept {
                key: key_of(dev, x, g),
                p: CudaStorage::wrap_cuda_slice(p, dev.clone()),
            };
            SLOT.with(|s| *s.borrow_mut() = Some(kept));
        }
        Ok(CudaStorage::wrap_cuda_slice(z, dev.clone()))
    }

    /// The filter-gradient product for one dtype: dW (K × R·S·C, channels-last) = dZᵀ · P, in
    /// parts ([`super::set_image_gemm_split`]) or as one product.
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
        // the forward pass's P when it kept it for this input, else unfolded again
        let kept = take_kept(key_of(dev, x, g));
        let unfolded;
        let p = match &kept {
            Some(s) => s.as_cuda_slice::<T>()?,
            None => {
                unfolded = im2col(dev, x, g)?;
                &unfolded
            }
        };
        if p.len() != g.rows() * cols {
            candle_core::bail!(
                "image GEMM: the kept unfolded image has {} values, not {}",
                p.len(),
                g.rows() * cols
            );
        }
        let parts = super::split_products().then_some(super::SPLIT_ROWS);
        match super::bwd_filter_plan(g.rows(), g.k, cols, parts) {
            BwdFilterPlan::One(pr) => {
                // SAFETY: the product writes all K·cols values (beta = 0).
                let mut dwp = unsafe { dev.alloc::<T>(g.k * cols) }?;
                let what = "filter-gradient product";
                run(dev, what, &pr, &p.slice(..), dz, &mut dwp.slice_mut(..))?;
                if cols == taps {
                    return Ok(CudaStorage::wrap_cuda_slice(dwp, dev.clone()));
                }
                let dw = copy_cols(dev, &dwp.slice(..), g.k, cols, taps)?;
                Ok(CudaStorage::wrap_cuda_slice(dw, dev.clone()))
            }
            BwdFilterPlan::Split { slots, parts, rest } => {
                // SAFETY: the parts' products write all slots·K·cols values (beta = 0).
                let mut partials = unsafe { dev.alloc::<f32>(slots * g.k * cols) }?;
                let what = "filter-gradient products in parts";
                run_f32_out(dev, what, &parts, &p.slice(..), dz, &mut partials.slice_mut(..))?;
                if let Some(rest) = rest {
                    run_f32_out(dev, what, &rest, &p.slice(..), dz, &mut partials.slice_mut(..))?;
                }
                let dw = sum_parts::<T>(dev, &partials, slots, g.k, cols, taps)?;
                Ok(CudaStorage::wrap_cuda_slice(dw, dev.clone()))
            }
        }
    }

    /// [`run`] with the product's C in f32 whatever T (cuBLAS's `GemmEx` types: bf16 or f16
    /// A and B with an f32 C and f32 accumulation), so the filter gradient's parts keep their
    /// sums unrounded until [`sum_parts`] adds them.
    fn run_f32_out<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        what: &str,
        pr: &Product,
        a: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        c: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType_t};
        check_extents(what, pr, (a.len(), b.len(), c.len()))?;
        let ab_type = match T::DTYPE {
            DType::F32 => cudaDataType_t::CUDA_R_32F,
            DType::BF16 => cudaDataType_t::CUDA_R_16BF,
            DType::F16 => cudaDataType_t::CUDA_R_16F,
            other => candle_core::bail!("image GEMM {what}: {other:?} is not a product type"),
        };
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        let (m, n, k) = pr.mnk;
        let (lda, ldb, ldc) = pr.ld;
        let stride = |v: usize| i64::try_from(v).map_err(|_| err(what, "stride past 2^63"));
        let (sa, sb, sc) = (stride(pr.strides.0)?, stride(pr.strides.1)?, stride(pr.strides.2)?);
        let (a, b) = (a.slice(pr.offsets.0..), b.slice(pr.offsets.1..));
        let mut c = c.slice_mut(pr.offsets.2..);
        let stream = dev.cuda_stream();
        let blas = dev.cublas_handle();
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (ap, _ra) = a.device_ptr(&stream);
        let (bp, _rb) = b.device_ptr(&stream);
        let (cp, _rc) = c.device_ptr_mut(&stream);
        // SAFETY: the three buffers hold the product's extents (checked above); alpha and beta
        // are f32 as the f32 compute type wants; cuBLAS runs on candle's stream.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *blas.handle(),
                op(pr.trans.0),
                op(pr.trans.1),
                i32_of(m, "size")?,
                i32_of(n, "size")?,
                i32_of(k, "size")?,
                (&alpha) as *const f32 as *const _,
                ap as *const _,
                ab_type,
                i32_of(lda, "leading dimension")?,
                sa,
                bp as *const _,
                ab_type,
                i32_of(ldb, "leading dimension")?,
                sb,
                (&beta) as *const f32 as *const _,
                cp as *mut _,
                cudaDataType_t::CUDA_R_32F,
                i32_of(ldc, "leading dimension")?,
                sc,
                i32_of(pr.batch, "batch")?,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| err(what, e))
    }

    /// dW (K × taps, T) = the sum of the `slots` f32 partial sums (K × cols each), by
    /// `sum_parts` (`kernels/im2col.cu`).
    fn sum_parts<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        partials: &CudaSlice<f32>,
        slots: usize,
        k: usize,
        cols: usize,
        taps: usize,
    ) -> Result<CudaSlice<T>> {
        if partials.len() < slots * k * cols || taps > cols {
            candle_core::bail!(
                "image GEMM: {} partial values for {slots} parts of {k} × {cols}",
                partials.len()
            );
        }
        let outs = u32_of(k * taps, "size")?;
        let (slots32, k32, cols32, taps32) = (
            u32_of(slots, "parts")?,
            u32_of(k, "filters")?,
            u32_of(cols, "columns")?,
            u32_of(taps, "taps")?,
        );
        // SAFETY: the kernel writes every one of the k·taps outputs.
        let mut dw = unsafe { dev.alloc::<T>(k * taps) }?;
        let func = dev.get_or_load_custom_func(&format!("sum_parts_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: grid::sum_parts(outs),
            block_dim: (grid::THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = func.builder();
        launch
            .arg(partials)
            .arg(&mut dw)
            .arg(&slots32)
            .arg(&k32)
            .arg(&cols32)
            .arg(&taps32);
        // SAFETY: argument types and count match `sum_parts_*`; partials holds slots·k·cols
        // values (checked above), dw k·taps; the block is the kernel's 256 threads.
        unsafe { launch.launch(cfg) }.map_err(|e| err("sum launch", e))?;
        Ok(dw)
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

    /// cuBLAS's definition in plain loops: column-major `C = op(A) · op(B)`, alpha 1, beta 0,
    /// `batch` times at the strides, from the offsets. Indexing the buffers past their ends
    /// panics, so a product that would read or write out of bounds fails here too.
    fn cublas_twin(pr: &Product, a: &[f64], b: &[f64], c: &mut [f64]) {
        let (m, n, k) = pr.mnk;
        let (lda, ldb, ldc) = pr.ld;
        // what cuBLAS refuses (CUBLAS_STATUS_INVALID_VALUE)
        let stored_rows = |trans: bool, rows: usize, cols: usize| if trans { cols } else { rows };
        assert!(lda >= stored_rows(pr.trans.0, m, k).max(1), "lda {lda} in {pr:?}");
        assert!(ldb >= stored_rows(pr.trans.1, k, n).max(1), "ldb {ldb} in {pr:?}");
        assert!(ldc >= m.max(1), "ldc {ldc} in {pr:?}");
        assert!(pr.batch >= 1 && m >= 1 && n >= 1 && k >= 1, "{pr:?}");
        for bi in 0..pr.batch {
            let oa = pr.offsets.0 + bi * pr.strides.0;
            let ob = pr.offsets.1 + bi * pr.strides.1;
            let oc = pr.offsets.2 + bi * pr.strides.2;
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0;
                    for l in 0..k {
                        // op(A)[i, l] and op(B)[l, j] of the stored column-major matrices
                        let av = if pr.trans.0 {
                            a[oa + l + i * lda]
                        } else {
                            a[oa + i + l * lda]
                        };
                        let bv = if pr.trans.1 {
                            b[ob + j + l * ldb]
                        } else {
                            b[ob + l + j * ldb]
                        };
                        acc += av * bv;
                    }
                    c[oc + i + j * ldc] = acc;
                }
            }
        }
    }

    fn values(n: usize, seed: u64) -> Vec<f64> {
        (0..n as u64)
            .map(|i| ((i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97)) % 1999) as f64 / 999.5 - 1.0)
            .collect()
    }

    /// The CUDA launcher's products, run through [`cublas_twin`]: the forward product gives
    /// Z = P · Wpᵀ, and the filter gradient dWp = dZᵀ · P both as one product and in parts
    /// (rows that divide evenly into the parts and rows that leave a shorter last part, one
    /// row, fewer rows than a part), with each product's extents exactly the buffers it gets.
    #[test]
    fn the_products_compute_the_layer_and_its_filter_gradient() {
        for &(rows, k, cols, part) in &[
            (1usize, 3usize, 8usize, 4usize),
            (37, 5, 16, 8),
            (40, 4, 8, 10),
            (40, 4, 8, 64),
            (1000, 7, 24, 3),
            (6400, 32, 112, 5),
        ] {
            let p = values(rows * cols, 1);
            let wp = values(k * cols, 2);
            let dz = values(rows * k, 3);
            let what = format!("rows {rows}, K {k}, cols {cols}, parts of {part}");
            // forward: Z[row, ki] = Σ_t P[row, t] · Wp[ki, t]
            let pr = fwd_product(rows, k, cols);
            assert_eq!(pr.extents(), (k * cols, rows * cols, rows * k), "{what}");
            let mut z = vec![f64::NAN; rows * k];
            cublas_twin(&pr, &wp, &p, &mut z);
            for row in 0..rows {
                for ki in 0..k {
                    let want: f64 = (0..cols).map(|t| p[row * cols + t] * wp[ki * cols + t]).sum();
                    assert!((z[row * k + ki] - want).abs() < 1e-9, "{what}: Z[{row}, {ki}]");
                }
            }
            // filter gradient: dWp[ki, t] = Σ_row dZ[row, ki] · P[row, t]
            let want: Vec<f64> = (0..k * cols)
                .map(|i| {
                    (0..rows)
                        .map(|row| dz[row * k + i / cols] * p[row * cols + i % cols])
                        .sum()
                })
                .collect();
            for parts in [None, Some(part)] {
                let mut dwp = vec![f64::NAN; k * cols];
                match bwd_filter_plan(rows, k, cols, parts) {
                    BwdFilterPlan::One(pr) => {
                        assert!(parts.is_none() || rows <= part, "{what}: one product");
                        assert_eq!(pr.extents(), (rows * cols, rows * k, k * cols), "{what}");
                        cublas_twin(&pr, &p, &dz, &mut dwp);
                    }
                    BwdFilterPlan::Split { slots, parts: pp, rest } => {
                        assert!((2..=MAX_PARTS).contains(&slots) && rows > part, "{what}: {slots} parts");
                        let mut partials = vec![f64::NAN; slots * k * cols];
                        // the parts' products together cover every row and every partial slot once
                        let last = rest.map_or(pp.extents(), |r| r.extents());
                        assert_eq!(last, (rows * cols, rows * k, slots * k * cols), "{what}");
                        cublas_twin(&pp, &p, &dz, &mut partials);
                        if let Some(r) = rest {
                            assert_eq!(slots, pp.batch + 1, "{what}");
                            cublas_twin(&r, &p, &dz, &mut partials);
                        }
                        assert!(partials.iter().all(|v| v.is_finite()), "{what}: a slot unwritten");
                        // what `sum_parts` adds (its emulator test checks the kernel against this)
                        for (o, d) in dwp.iter_mut().enumerate() {
                            *d = (0..slots).map(|i| partials[i * k * cols + o]).sum();
                        }
                    }
                }
                for (i, (got, want)) in dwp.iter().zip(&want).enumerate() {
                    assert!(
                        (got - want).abs() < 1e-9 * (1.0 + want.abs()),
                        "{what}, {parts:?}: dWp[{i}] {got} vs {want}"
                    );
                }
            }
        }
        // the nets' sizes: Dieleman's image layer at batch 256 (4,096 parts of 40×40 outputs)
        // in about 400 parts of 16,384 rows; never more than MAX_PARTS
        let BwdFilterPlan::Split { slots, .. } = bwd_filter_plan(4096 * 1600, 32, 112, Some(SPLIT_ROWS)) else {
            panic!("Dieleman's image layer is one product");
        };
        assert_eq!(slots, 400);
        let BwdFilterPlan::Split { slots, .. } = bwd_filter_plan(1 << 30, 32, 112, Some(SPLIT_ROWS)) else {
            panic!("one product");
        };
        assert_eq!(slots, MAX_PARTS);
    }
}
