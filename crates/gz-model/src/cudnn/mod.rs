//! The fast convolution and max-pooling path: candle custom ops backed by cuDNN.
//!
//! [`crate::ops`] routes every convolution and 2×2 max-pool of the nets through here when the
//! tensor lives on a CUDA device, the crate is built with the `cudnn` feature and the fast path
//! is enabled ([`set_enabled`], on by default). The ops are ordinary candle custom ops, so
//! candle's autograd drives them: [`conv2d`] is a `CustomOp3` (input, weight, bias) whose
//! backward pass calls two more custom ops (backward-data, backward-filter) and a bias
//! reduction, each a single cuDNN call on CUDA; [`max_pool2`] is a `CustomOp1` whose backward is
//! one `cudnnPoolingBackward`.
//!
//! On CUDA (module `backend`, `cudnn` feature) the layout is candle's NCHW, contiguous; the
//! algorithm for each (op, shapes, dtype, math mode) is chosen once by cuDNN's timed search
//! (`cudnnFind…AlgorithmEx`) and cached with its descriptors for the rest of the run; every call
//! shares one workspace buffer that only ever grows; the cuDNN handle runs on candle's own
//! stream, so there is no host synchronisation inside a step. bf16 and f16 use tensor-op math
//! with f32 accumulation; f32 may use TF32 tensor cores (as PyTorch does by default) unless
//! [`set_allow_tf32`]`(false)`. The measured route and its numbers are in
//! `../shared/cuda/README.md` and `docs/cudnn.md`.
//!
//! On CPU the same ops run gz's own f32 convolution ([`crate::cpu_conv`]; candle's `conv2d` and
//! `conv_transpose2d` for other dtypes or with `GZ_CPU_CONV=candle`) or plain loops,
//! so CPU tests exercise the op plumbing and the gradient formulas of the fast path. The
//! max-pool op also avoids two candle 0.11.1 bugs in `max_pool2d`'s backward: it scales each
//! window's gradient by the fraction of maxima in the window (a unique maximum gets a quarter of
//! its gradient, see [`max_pool2_by_reduction`]), and it upsamples the pooled map by
//! `floor(i·out/in)`, which misroutes gradients when the input side is odd (53→26 and 13→6 in
//! VGG16-blog); ours routes each window's gradient to its first maximum, like cuDNN.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};

use crate::grad_sink;

#[cfg(feature = "cudnn")]
mod backend;
mod fused;
mod im2col;
pub mod layout;
#[cfg(test)]
mod tests;
mod tower;

pub(crate) use fused::bias_relu_nhwc;
#[cfg(test)]
pub(crate) use fused::with_pool_mask;
pub use fused::{bias_relu, set_nhwc_vectorised, set_pool_mask, set_wide_bias_finish};
pub use im2col::{image_gemm_enabled, set_image_gemm, set_image_gemm_bwd_filter, set_image_gemm_split};
pub use tower::{tower, TowerLayer};

static ENABLED: AtomicBool = AtomicBool::new(true);
static ALLOW_TF32: AtomicBool = AtomicBool::new(true);
static PROFILING: AtomicBool = AtomicBool::new(false);
/// On by default since the 2026-11-30 device run: its tests passed on the H200 and it made
/// VGG16-blog's bf16 step 3.6× faster (docs/benchmarks.md).
static FUSED: AtomicBool = AtomicBool::new(true);
/// Channels-last everywhere the custom ops run, the CPU included (tests; [`set_nhwc`]).
static NHWC: AtomicBool = AtomicBool::new(false);
/// Channels-last on CUDA (on by default since the 2026-11-30 device run; [`set_nhwc_on_cuda`]).
static NHWC_CUDA: AtomicBool = AtomicBool::new(true);
/// Channels-last from the image layer on (see [`set_nhwc_image`]), its channels zero-padded
/// to a multiple of 8 in the tower op (see [`set_nhwc_image_padded`]): `PAD_OFF`, `PAD_ON`, or
/// `PAD_AUTO` (3×3 image filters only, as measured).
static NHWC_IMAGE: AtomicBool = AtomicBool::new(true);
static NHWC_IMAGE_PADDED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(PAD_AUTO);
const PAD_OFF: u8 = 0;
const PAD_ON: u8 = 1;
const PAD_AUTO: u8 = 2;
/// On the fused path, conv + epilogue (+ pool) as one op each (see [`set_single_ops`]).
static SINGLE_CONV_RELU: AtomicBool = AtomicBool::new(true);
static FUSED_POOL: AtomicBool = AtomicBool::new(true);
static TOWER_OP: AtomicBool = AtomicBool::new(true);
static CPU_FUSED: AtomicBool = AtomicBool::new(true);

/// True when this build contains the cuDNN backend (the `cudnn` cargo feature).
pub fn compiled() -> bool {
    cfg!(feature = "cudnn")
}

/// Switches the cuDNN fast path on or off for the whole process (on by default). Off means
/// [`crate::ops`] uses candle's stock kernels everywhere, the reference path for comparisons.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the fast path is switched on (see [`set_enabled`]).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether [`crate::ops`] should use the cuDNN ops for tensors on `device`: the feature is
/// compiled in, the path is enabled, and the device is CUDA.
pub fn active_for(device: &Device) -> bool {
    compiled() && enabled() && device.is_cuda()
}

/// Switches the fused bias + ReLU epilogue ([`conv2d_relu`]) in the nets on (the default: the
/// 2026-11-30 device run checked the kernels on an H200) or off; off, the NCHW fast path adds
/// the bias as cuDNN's unfused path does and the nets apply candle's ReLU, and the dense
/// layers, the tree layer and dropout take candle's ops. Channels-last towers (the CUDA
/// default) always run the fused ops, so the unfused path is `GZ_FUSED=0 GZ_NHWC=0` in `gz`.
pub fn set_fused(on: bool) {
    FUSED.store(on, Ordering::Relaxed);
}

/// Whether the fused epilogue is switched on (see [`set_fused`]).
pub fn fused_enabled() -> bool {
    FUSED.load(Ordering::Relaxed)
}

/// Lets CPU training build each convolution + bias + ReLU (+ 2×2 max-pool) as one graph node
/// (the fused ops' CPU paths: gz's f32 convolution, the ReLU in place, the pooling and the
/// backward passes in one parallel pass each) rather than the convolution op, candle's `relu`
/// and the pooling op (on by default; `false`, `GZ_CPU_FUSED=0` in `gz`, for comparisons).
/// Candle's autograd zero-fills and adds one activation-sized gradient per graph node, and its
/// ReLU backward is a single-threaded comparison, a cast and a product.
pub fn set_cpu_fused(on: bool) {
    CPU_FUSED.store(on, Ordering::Relaxed);
}

/// Whether a convolution layer of `x` and `w` takes the fused ops on the CPU: f32 NCHW
/// training (a graph to build) with gz's CPU convolution and [`set_cpu_fused`] on.
pub(crate) fn cpu_fused_for(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && CPU_FUSED.load(Ordering::Relaxed)
        && enabled()
        && crate::cpu_conv::enabled()
        && (x.track_op() || w.track_op())
}

/// Runs the nets' convolution towers channels-last (NHWC activations, KRSC filters) wherever
/// the custom ops run: CUDA with the fast path, and the CPU (where the ops permute to NCHW
/// around the CPU convolution: slower, but the same plumbing, which is how the CPU tests check
/// it). Off by default, which leaves the CPU in NCHW; CUDA has its own switch,
/// [`set_nhwc_on_cuda`], on by default. `GZ_NHWC=1` calls this in `gz`. Checkpoints are the
/// same in both layouts (weights stay (K, C, R, S)).
pub fn set_nhwc(on: bool) {
    NHWC.store(on, Ordering::Relaxed);
}

/// Runs the towers channels-last on CUDA (the default: the 2026-11-30 device run measured
/// VGG16-blog's bf16 step 1.07× and Dieleman's 1.03× faster, 1.10× and 1.25× with the image
/// layer too) or NCHW (`false`; `GZ_NHWC=0` in `gz`). The CPU keeps NCHW unless [`set_nhwc`].
pub fn set_nhwc_on_cuda(on: bool) {
    NHWC_CUDA.store(on, Ordering::Relaxed);
}

/// A process-wide switch's override on this thread (`None`: the process-wide value holds).
type ThreadOverride = std::thread::LocalKey<std::cell::Cell<Option<bool>>>;

thread_local! {
    static NHWC_HERE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    static NHWC_IMAGE_HERE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    static NHWC_IMAGE_PADDED_HERE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with `here` set to `on`, restoring it afterwards.
fn with_override<R>(here: &'static ThreadOverride, on: bool, f: impl FnOnce() -> R) -> R {
    let before = here.with(|c| c.replace(Some(on)));
    let r = f();
    here.with(|c| c.set(before));
    r
}

/// The switch's value on this thread: its override, else the process-wide value.
fn switch(here: &'static ThreadOverride, global: &AtomicBool) -> bool {
    here.with(|c| c.get()).unwrap_or_else(|| global.load(Ordering::Relaxed))
}

/// Runs `f` with the channels-last switch overridden on this thread only (tests compare both
/// layouts without disturbing other threads).
pub fn with_nhwc<R>(on: bool, f: impl FnOnce() -> R) -> R {
    with_override(&NHWC_HERE, on, f)
}

/// Whether the nets run channels-last on `device` (see [`set_nhwc`], [`set_nhwc_on_cuda`],
/// [`with_nhwc`]).
pub fn nhwc_for(device: &Device) -> bool {
    match NHWC_HERE.with(|c| c.get()) {
        Some(on) => on && (device.is_cpu() || active_for(device)),
        None => {
            (NHWC.load(Ordering::Relaxed) && (device.is_cpu() || active_for(device)))
                || (NHWC_CUDA.load(Ordering::Relaxed) && active_for(device))
        }
    }
}

/// With channels-last on, runs the image layer channels-last too: the tower permutes its
/// 3-channel input (one tenth of the first convolution's output) instead of the first
/// convolution's output, and the backward pass needs no permutation at all (the image needs no
/// gradient). On by default since the 2026-11-30 device run (VGG16-blog's bf16 step 1.06×,
/// Dieleman's 1.25× faster than starting channels-last at the first 8-channel layer);
/// `GZ_NHWC_IMAGE=0` in `gz` switches it off.
pub fn set_nhwc_image(on: bool) {
    NHWC_IMAGE.store(on, Ordering::Relaxed);
}

/// Runs `f` with [`set_nhwc_image`]'s switch overridden on this thread only (for tests).
pub fn with_nhwc_image<R>(on: bool, f: impl FnOnce() -> R) -> R {
    with_override(&NHWC_IMAGE_HERE, on, f)
}

/// With the image layer channels-last ([`set_nhwc_image`]), the tower op (`cudnn::tower`, the
/// fused path's) zero-pads the image's channels to a multiple of 8 (3 → 8), and the filter's to
/// match, so that cuDNN can take its NHWC tensor-core kernels for the first layer too: 8/3 of
/// that layer's arithmetic (under 1 % of VGG16-blog's) for the faster kernels. The filter
/// gradient's padded part is dropped, so the model and checkpoints do not change. The layers
/// run one by one (`GZ_TOWER_OP=0`) do not pad. By default the tower pads 3×3 image filters
/// only: the 2026-11-30 device run measured VGG16-blog's bf16 step 1.04× faster padded, and
/// Dieleman's (6×6 image filters) 0.99× in training and 0.95× in inference. With the image layers as
/// matrix products ([`set_image_gemm`]) the default pads none (the product needs no padding). Calling this sets
/// it for every image layer (`GZ_NHWC_IMAGE=pad` pads all, `GZ_NHWC_IMAGE=1` none, in `gz`).
pub fn set_nhwc_image_padded(on: bool) {
    NHWC_IMAGE_PADDED.store(if on { PAD_ON } else { PAD_OFF }, Ordering::Relaxed);
}

/// Runs `f` with [`set_nhwc_image_padded`]'s switch overridden on this thread only (for tests).
pub fn with_nhwc_image_padded<R>(on: bool, f: impl FnOnce() -> R) -> R {
    with_override(&NHWC_IMAGE_PADDED_HERE, on, f)
}

/// The channels the tower op gives a layer of `in_channels` and `kernel` (height, width) when
/// it switches to channels-last there: the next multiple of 8 where [`set_nhwc_image_padded`]
/// says so (by default for 3×3 filters, unless the image layers run as products), else
/// `in_channels`.
pub(crate) fn nhwc_padded_channels(in_channels: usize, kernel: (usize, usize)) -> usize {
    let pad =
        NHWC_IMAGE_PADDED_HERE
            .with(|c| c.get())
            .unwrap_or_else(|| match NHWC_IMAGE_PADDED.load(Ordering::Relaxed) {
                PAD_OFF => false,
                PAD_ON => true,
                // not for the image layers as products (`set_image_gemm`): padding would only
                // make their unfolded image larger (72 columns instead of 32 for 3×3)
                _ => kernel == (3, 3) && !image_gemm_enabled(),
            });
    if pad {
        in_channels.next_multiple_of(8)
    } else {
        in_channels
    }
}

/// The fast path's settings on `device` in one line (for `gz bench-train` and device logs,
/// which are all a device run brings back): epilogue, layout and image layer, the epilogue
/// kernels' width, the tower op, the resampling kernels and the optimizer update. "off" where
/// the fast path does not run on `device`.
pub fn fast_path_summary(device: &Device) -> String {
    if !active_for(device) {
        return "off (the cuDNN path runs on CUDA devices of a `cudnn` build)".into();
    }
    let onoff = |on: bool| if on { "on" } else { "off" };
    let layout = if nhwc_for(device) {
        let image = if !nhwc_starts_at(3) {
            "image layer NCHW".to_string()
        } else {
            let pad = match NHWC_IMAGE_PADDED_HERE.with(|c| c.get()) {
                Some(true) => "padded to 8 channels",
                Some(false) => "unpadded",
                None => match NHWC_IMAGE_PADDED.load(Ordering::Relaxed) {
                    PAD_OFF => "unpadded",
                    PAD_ON => "padded to 8 channels",
                    _ if image_gemm_enabled() => "unpadded (a matrix product)",
                    _ => "padded to 8 channels where its filter is 3×3",
                },
            };
            format!("image layer channels-last, {pad}")
        };
        format!("channels-last ({image})")
    } else {
        "NCHW".into()
    };
    let epilogue = if fused_enabled() {
        "on"
    } else if nhwc_for(device) {
        "off but in the channels-last towers (they always run it)"
    } else {
        "off"
    };
    format!(
        "fused epilogue {epilogue}, {layout}, image layer as a matrix product {}, epilogue kernels {}, bias-gradient finish {}, pooling masks {}, tower op {}, resampling kernels {}, fused optimizer {}",
        onoff(image_gemm_enabled()),
        if fused::nhwc_vectorised() {
            "vectorised"
        } else {
            "scalar"
        },
        if fused::wide_bias_finish() {
            "a block per channel"
        } else {
            "a thread per channel"
        },
        onoff(fused::pool_mask()),
        onoff(tower_op_enabled()),
        onoff(crate::augment::resample_kernels_enabled()),
        onoff(crate::optim::fused_enabled()),
    )
}

/// Whether a channels-last tower still in NCHW switches layout before a convolution with
/// `in_channels` input channels: at the first multiple of 8 (cuDNN's NHWC tensor-core kernels
/// want that), or at once with [`set_nhwc_image`].
pub fn nhwc_starts_at(in_channels: usize) -> bool {
    in_channels % 8 == 0 || switch(&NHWC_IMAGE_HERE, &NHWC_IMAGE)
}

/// Allows (default) or forbids TF32 tensor-core math for f32 convolutions. Takes effect for
/// shapes not planned yet (the plan cache key includes this flag).
pub fn set_allow_tf32(on: bool) {
    ALLOW_TF32.store(on, Ordering::Relaxed);
}

#[cfg_attr(not(feature = "cudnn"), allow(dead_code, reason = "read by the cuDNN backend"))]
fn allow_tf32() -> bool {
    ALLOW_TF32.load(Ordering::Relaxed)
}

/// Turns per-call GPU timing on or off. When on, every cuDNN call is bracketed by CUDA events
/// (no host synchronisation); [`take_profile`] sums them.
pub fn set_profiling(on: bool) {
    PROFILING.store(on, Ordering::Relaxed);
}

#[cfg_attr(not(feature = "cudnn"), allow(dead_code, reason = "read by the cuDNN backend"))]
fn profiling() -> bool {
    PROFILING.load(Ordering::Relaxed)
}

/// GPU time spent in the cuDNN calls of this thread since the last [`take_profile`], in
/// milliseconds, per kind of call.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Profile {
    pub conv_fwd_ms: f64,
    pub conv_bwd_data_ms: f64,
    pub conv_bwd_filter_ms: f64,
    /// Bias add and bias gradient: cuDNN's calls (f32 without the fused epilogue) or the fused
    /// bias + ReLU kernels (forward and backward, ReLU included).
    pub bias_ms: f64,
    pub pool_ms: f64,
    pub calls: usize,
}

impl Profile {
    /// All convolution time (forward, both backward passes, bias add and bias gradient).
    pub fn conv_ms(&self) -> f64 {
        self.conv_fwd_ms + self.conv_bwd_data_ms + self.conv_bwd_filter_ms + self.bias_ms
    }
}

/// Waits for the recorded events of this thread on `device` and returns their summed times
/// (zero when profiling was off, on CPU, or without the `cudnn` feature).
pub fn take_profile(device: &Device) -> Result<Profile> {
    #[cfg(feature = "cudnn")]
    if let Device::Cuda(dev) = device {
        return backend::take_profile(dev);
    }
    let _ = device;
    Ok(Profile::default())
}

/// One line per planned cuDNN call (shape, dtype, chosen algorithm, math type, workspace),
/// for logs and the benchmark report. Empty without the feature or before the first step.
pub fn plan_report() -> Vec<String> {
    #[cfg(feature = "cudnn")]
    {
        backend::plan_report()
    }
    #[cfg(not(feature = "cudnn"))]
    {
        Vec::new()
    }
}

/// 2-D convolution (cross-correlation, as candle and PyTorch) plus bias, through the custom op:
/// `x` (N,C,H,W), `w` (K,C,kh,kw), `b` (K) → (N,K,H',W'). All three must share one dtype and
/// device. Differentiable with respect to all three.
pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let params = check_conv(x, w, b, padding, stride, false)?;
    let (x, w, b) = (x.contiguous()?, w.contiguous()?, b.contiguous()?);
    if cuda_supports(x.device(), x.dtype(), |s| s.bias)? {
        x.apply_op3(&w, &b, Conv2dOp(params))
    } else {
        // This cuDNN has no bias add / bias gradient for the dtype: convolve in cuDNN, add the
        // bias with candle.
        x.apply_op2(&w, Conv2dNoBiasOp(params))?
            .broadcast_add(&b.reshape((1, (), 1, 1))?)
    }
}

/// `relu(conv2d(x, w) + b)`: the convolution in cuDNN, then bias and ReLU in one fused kernel
/// ([`bias_relu`]; two kernels backward, including the bias gradient). Every dtype takes this
/// route, so bf16 no longer falls back to candle's broadcast add. Same arguments as [`conv2d`].
///
/// It is one custom op (`fused::ConvBiasRelu`): the pre-activation is not kept for the
/// backward pass. [`set_single_ops`]`(false, _)` builds the older two-op graph (convolution,
/// then [`bias_relu`]) instead, to measure the difference; both compute the same values.
pub fn conv2d_relu(x: &Tensor, w: &Tensor, b: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    conv_relu(
        check_conv(x, w, b, padding, stride, false)?,
        x,
        w,
        b,
        single_conv_relu_op(),
    )
}

/// Chooses the graph the fused path builds (both on by default; off only to measure the
/// difference, the values are the same): `conv_relu` makes [`conv2d_relu`] one custom op rather
/// than the convolution then [`bias_relu`]; `pool` makes [`conv2d_relu_pool`] one op with the
/// one-pass ReLU + pool backward rather than [`conv2d_relu`] then [`max_pool2`] (it needs
/// `conv_relu` too). `gz` reads `GZ_CONV_RELU_OP=0` and `GZ_FUSED_POOL=0`.
pub fn set_single_ops(conv_relu: bool, pool: bool) {
    SINGLE_CONV_RELU.store(conv_relu, Ordering::Relaxed);
    FUSED_POOL.store(pool, Ordering::Relaxed);
}

/// On the fused path, runs each convolution tower as one autograd node with its own backward
/// pass ([`tower()`], default) or layer by layer (`false`; `gz` reads `GZ_TOWER_OP=0`).
pub fn set_tower_op(on: bool) {
    TOWER_OP.store(on, Ordering::Relaxed);
}

/// Whether [`crate::ops::run_tower`] may run a tower as one node ([`set_tower_op`]).
pub fn tower_op_enabled() -> bool {
    TOWER_OP.load(Ordering::Relaxed)
}

/// Whether [`conv2d_relu`] builds one op (default) or two.
fn single_conv_relu_op() -> bool {
    SINGLE_CONV_RELU.load(Ordering::Relaxed)
}

/// [`conv2d_relu`] (or its NHWC twin) as one op (`single`) or as convolution then [`bias_relu`].
fn conv_relu(params: ConvParams, x: &Tensor, w: &Tensor, b: &Tensor, single: bool) -> Result<Tensor> {
    let (x, w, b) = (x.contiguous()?, w.contiguous()?, b.contiguous()?);
    if single {
        return x.apply_op3(&w, &b, fused::ConvBiasRelu(params));
    }
    let z = x.apply_op2(&w, Conv2dNoBiasOp(params))?;
    if params.nhwc {
        fused::bias_relu_nhwc(&z, &b)
    } else {
        bias_relu(&z, &b)
    }
}

/// [`conv2d_relu`] in channels-last layout: `x` is (N, H, W, C), `w` is (K, R, S, C) (the
/// checkpoint's (K, C, R, S) weight permuted), the result (N, H', W', K). cuDNN's NHWC kernels
/// are the fast ones for bf16 tensor cores (503 vs 306 TFLOP/s in the probe); on CPU the ops
/// permute to NCHW around the CPU convolution, so CPU tests check the same plumbing.
pub fn conv2d_relu_nhwc(x: &Tensor, w: &Tensor, b: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    conv_relu(
        check_conv(x, w, b, padding, stride, true)?,
        x,
        w,
        b,
        single_conv_relu_op(),
    )
}

/// `max_pool2(conv2d_relu(x, w, b))`, the pooled layers of both nets, as one custom op
/// (`fused::ConvBiasReluPool`): the epilogue and the pooling are one kernel forward, the ReLU
/// output is kept inside the op for the backward pass, which is one kernel for the pool's and
/// the ReLU's gradients and the bias gradient (no cuDNN pooling call either way). After
/// [`set_single_ops`] switched it off, [`conv2d_relu`] then [`max_pool2`], to measure the
/// difference.
pub fn conv2d_relu_pool(x: &Tensor, w: &Tensor, b: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    conv_relu_pool(check_conv(x, w, b, padding, stride, false)?, x, w, b, fused_pool_op())
}

/// [`conv2d_relu_pool`] in channels-last layout (arguments as [`conv2d_relu_nhwc`]).
pub fn conv2d_relu_pool_nhwc(x: &Tensor, w: &Tensor, b: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    conv_relu_pool(check_conv(x, w, b, padding, stride, true)?, x, w, b, fused_pool_op())
}

/// Whether [`conv2d_relu_pool`] builds one op (default) or conv-ReLU then pool.
fn fused_pool_op() -> bool {
    FUSED_POOL.load(Ordering::Relaxed) && single_conv_relu_op()
}

/// [`conv2d_relu_pool`] (or its NHWC twin) as one op (`single`) or as [`conv_relu`] then the
/// pooling op.
fn conv_relu_pool(params: ConvParams, x: &Tensor, w: &Tensor, b: &Tensor, single: bool) -> Result<Tensor> {
    let (_, _, h, wd) = nchw_dims(x.shape(), params.nhwc)?;
    let (_, _, kh, kw) = nchw_dims(w.shape(), params.nhwc)?;
    let (oh, ow) = (params.out_dim(h, kh), params.out_dim(wd, kw));
    if oh < 2 || ow < 2 {
        candle_core::bail!("max_pool2: input {oh}×{ow} is smaller than the 2×2 window");
    }
    if single {
        let (x, w, b) = (x.contiguous()?, w.contiguous()?, b.contiguous()?);
        return x.apply_op3(&w, &b, fused::ConvBiasReluPool::new(params));
    }
    let y = conv_relu(params, x, w, b, single)?;
    if params.nhwc {
        max_pool2_nhwc(&y)
    } else {
        max_pool2(&y)
    }
}

/// Checks the shapes and dtypes of a convolution's arguments (NHWC / KRSC when `nhwc`).
fn check_conv(x: &Tensor, w: &Tensor, b: &Tensor, padding: usize, stride: usize, nhwc: bool) -> Result<ConvParams> {
    let (_, c, h, wd) = if nhwc {
        let (n, h, w, c) = x.dims4()?;
        (n, c, h, w)
    } else {
        x.dims4()?
    };
    let (k, wc, kh, kw) = if nhwc {
        let (k, r, s, c) = w.dims4()?;
        (k, c, r, s)
    } else {
        w.dims4()?
    };
    if c != wc {
        candle_core::bail!("conv2d: input has {c} channels but the weight expects {wc}");
    }
    if b.dims() != [k] {
        candle_core::bail!("conv2d: bias shape {:?} does not match {k} output channels", b.dims());
    }
    if x.dtype() != w.dtype() || x.dtype() != b.dtype() {
        candle_core::bail!(
            "conv2d: dtypes differ (x {:?}, w {:?}, b {:?})",
            x.dtype(),
            w.dtype(),
            b.dtype()
        );
    }
    if stride == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
        candle_core::bail!(
            "conv2d: kernel {kh}×{kw} (padding {padding}, stride {stride}) does not fit a {h}×{wd} input"
        );
    }
    Ok(ConvParams { padding, stride, nhwc })
}

/// On CUDA with the backend: whether cuDNN supports the calls `pick` selects for `dtype`.
/// Elsewhere true (the CPU fallbacks support everything).
#[allow(unused_variables, reason = "the arguments are only used with the cudnn feature")]
fn cuda_supports(device: &Device, dtype: DType, pick: impl Fn(&backend_support::Support) -> bool) -> Result<bool> {
    #[cfg(feature = "cudnn")]
    if let Device::Cuda(dev) = device {
        return Ok(pick(&backend::support(dev, dtype)?));
    }
    Ok(true)
}

#[cfg(feature = "cudnn")]
use backend as backend_support;

#[cfg(not(feature = "cudnn"))]
mod backend_support {
    /// Stand-in for the backend's probe result when the backend is not compiled.
    pub(super) struct Support {
        pub bias: bool,
        pub pool: bool,
    }
}

/// 2×2 max-pooling with stride 2, floor mode (odd trailing rows/columns are dropped), through
/// the custom op. Differentiable; the gradient of each window goes to its first maximum.
pub fn max_pool2(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h < 2 || w < 2 {
        candle_core::bail!("max_pool2: input {h}×{w} is smaller than the 2×2 window");
    }
    if !cuda_supports(x.device(), x.dtype(), |s| s.pool)? {
        return max_pool2_by_reduction(x);
    }
    x.contiguous()?.apply_op1(MaxPool2Op { nhwc: false })
}

/// [`max_pool2`] on a channels-last (N, H, W, C) tensor, giving (N, H/2, W/2, C).
pub fn max_pool2_nhwc(x: &Tensor) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    if h < 2 || w < 2 {
        candle_core::bail!("max_pool2: input {h}×{w} is smaller than the 2×2 window");
    }
    if !cuda_supports(x.device(), x.dtype(), |s| s.pool)? {
        return max_pool2_by_reduction(&nchw_of(x)?)?
            .permute((0, 2, 3, 1))?
            .contiguous();
    }
    x.contiguous()?.apply_op1(MaxPool2Op { nhwc: true })
}

/// The dims of an activation (or filter) shape in (N, C, H, W) (or (K, C, R, S)) order.
fn nchw_dims(shape: &Shape, nhwc: bool) -> Result<(usize, usize, usize, usize)> {
    let (a, b, c, d) = shape.dims4()?;
    Ok(if nhwc { (a, d, b, c) } else { (a, b, c, d) })
}

/// An activation (or filter) shape from (N, C, H, W) (or (K, C, R, S)) dims.
#[cfg_attr(
    not(feature = "cudnn"),
    allow(dead_code, reason = "used by the CUDA side of the ops")
)]
fn shape_of(n: usize, c: usize, h: usize, w: usize, nhwc: bool) -> Shape {
    if nhwc {
        Shape::from((n, h, w, c))
    } else {
        Shape::from((n, c, h, w))
    }
}

/// A CPU tensor in the op's layout → NCHW (a no-op for NCHW ops).
fn cpu_in(t: Tensor, nhwc: bool) -> Result<Tensor> {
    if nhwc {
        nchw_of(&t)
    } else {
        Ok(t)
    }
}

/// An NCHW CPU result → the op's layout.
fn cpu_out(t: Tensor, nhwc: bool) -> Result<Tensor> {
    if nhwc {
        nhwc_of(&t)
    } else {
        Ok(t)
    }
}

/// (N, H, W, C) → (N, C, H, W), contiguous; also (K, R, S, C) filters → (K, C, R, S). The
/// transpose kernel on CUDA for tensors outside a graph ([`layout::transpose`]).
fn nchw_of(t: &Tensor) -> Result<Tensor> {
    let (n, h, w, c) = t.dims4()?;
    layout::transpose(t, n, h * w, c, &[n, c, h, w])
}

/// (N, C, H, W) → (N, H, W, C), contiguous; also (K, C, R, S) filters → (K, R, S, C). The
/// transpose kernel on CUDA for tensors outside a graph ([`layout::transpose`]).
fn nhwc_of(t: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = t.dims4()?;
    layout::transpose(t, n, c, h * w, &[n, h, w, c])
}

/// The same pooling from candle's generic ops (a reshape to 2×2 windows and two `max`
/// reductions), for devices and dtypes without the custom op. Not candle's `max_pool2d`: in
/// candle 0.11.1 its backward multiplies the gradient by the *fraction* of maxima in each window
/// instead of dividing by their count, so a unique maximum receives a quarter of its gradient
/// (and four tied ones the whole gradient each); with five pooling layers the first layers of
/// VGG16-blog got gradients 4⁵ ≈ 1,000 times too small. The reduction's backward gives each
/// maximum the whole gradient (ties, e.g. all-zero windows after a ReLU, each get it too).
pub fn max_pool2_by_reduction(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if h < 2 || w < 2 {
        candle_core::bail!("max_pool2: input {h}×{w} is smaller than the 2×2 window");
    }
    let (oh, ow) = (h / 2, w / 2);
    let x = if 2 * oh != h || 2 * ow != w {
        x.narrow(2, 0, 2 * oh)?.narrow(3, 0, 2 * ow)?.contiguous()?
    } else {
        x.contiguous()?
    };
    x.reshape((n, c, oh, 2, ow, 2))?.max(5)?.max(3)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConvParams {
    padding: usize,
    stride: usize,
    /// Channels-last activations (N, H, W, C) and (K, R, S, C) filters.
    nhwc: bool,
}

impl ConvParams {
    fn out_dim(&self, input: usize, k: usize) -> usize {
        (input + 2 * self.padding - k) / self.stride + 1
    }
}

/// Forward: (x, w, b) → y.
struct Conv2dOp(ConvParams);

/// Forward without bias: (x, w) → y, for dtypes whose bias calls cuDNN lacks.
struct Conv2dNoBiasOp(ConvParams);

/// Backward-data: (dy, w) → dx, with dx's spatial size recorded (stride can make it ambiguous).
struct ConvBwdData {
    p: ConvParams,
    x_hw: (usize, usize),
}

/// Backward-filter: (x, dy) → dw, with the kernel size recorded.
struct ConvBwdFilter {
    p: ConvParams,
    k_hw: (usize, usize),
}

/// Bias gradient: dy (N,K,H,W) → db (K).
struct BiasGrad;

/// Max-pool backward: (x, y, dy) → dx.
struct MaxPool2Bwd {
    nhwc: bool,
}

struct MaxPool2Op {
    nhwc: bool,
}

// ---------------------------------------------------------------------------------------------
// CPU fallbacks: candle tensors built from the op's storage.

/// Copies a (possibly strided) CPU storage view into a fresh contiguous tensor.
pub(crate) fn cpu_tensor(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    fn gather<T: Copy>(data: &[T], l: &Layout) -> Vec<T> {
        if let Some((a, b)) = l.contiguous_offsets() {
            return data[a..b].to_vec();
        }
        let dims = l.dims();
        let strides = l.stride();
        let n: usize = dims.iter().product();
        let mut out = Vec::with_capacity(n);
        let mut idx = vec![0usize; dims.len()];
        for _ in 0..n {
            let off = l.start_offset() + idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
            out.push(data[off]);
            for d in (0..dims.len()).rev() {
                idx[d] += 1;
                if idx[d] < dims[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out
    }
    let dev = Device::Cpu;
    match s {
        CpuStorage::F32(v) => Tensor::from_vec(gather(v, l), l.shape(), &dev),
        CpuStorage::F64(v) => Tensor::from_vec(gather(v, l), l.shape(), &dev),
        CpuStorage::BF16(v) => Tensor::from_vec(gather(v, l), l.shape(), &dev),
        CpuStorage::F16(v) => Tensor::from_vec(gather(v, l), l.shape(), &dev),
        // the pooling masks (fused::PoolSaved::Mask)
        CpuStorage::U8(v) => Tensor::from_vec(gather(v, l), l.shape(), &dev),
        other => candle_core::bail!("cudnn ops: unsupported dtype {:?} on CPU", other.dtype()),
    }
}

pub(crate) fn cpu_storage(t: &Tensor) -> Result<(CpuStorage, Shape)> {
    let shape = t.shape().clone();
    let flat = t.flatten_all()?;
    let s = match t.dtype() {
        DType::F32 => CpuStorage::F32(flat.to_vec1()?),
        DType::F64 => CpuStorage::F64(flat.to_vec1()?),
        DType::BF16 => CpuStorage::BF16(flat.to_vec1()?),
        DType::F16 => CpuStorage::F16(flat.to_vec1()?),
        other => candle_core::bail!("cudnn ops: unsupported dtype {other:?} on CPU"),
    };
    Ok((s, shape))
}

/// `conv(x, w) (+ b)` on CPU tensors (NCHW): gz's own f32 kernel ([`crate::cpu_conv`]) where
/// it applies, candle's `conv2d` otherwise.
fn cpu_conv(p: ConvParams, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if let Some(y) = crate::cpu_conv::conv2d(x, w, b, p.padding, p.stride)? {
        return Ok(y);
    }
    let y = x.conv2d(w, p.padding, p.stride, 1, 1)?;
    match b {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}

fn cpu_conv_fwd(p: ConvParams, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    cpu_conv(p, x, w, Some(b))
}

/// dx = conv_transpose(dy, w), the formula candle's own conv2d backward uses, made exact for
/// non-square inputs by over-padding and narrowing.
fn cpu_conv_bwd_data(p: ConvParams, dy: &Tensor, w: &Tensor, x_hw: (usize, usize)) -> Result<Tensor> {
    if let Some(dx) = crate::cpu_conv::conv2d_backward_data(dy, w, x_hw, p.padding, p.stride)? {
        return Ok(dx);
    }
    let (_, _, kh, kw) = w.dims4()?;
    let (_, _, gh, gw) = dy.dims4()?;
    let base_h = (gh - 1) * p.stride + kh - 2 * p.padding;
    let base_w = (gw - 1) * p.stride + kw - 2 * p.padding;
    let out_pad = x_hw.0.saturating_sub(base_h).max(x_hw.1.saturating_sub(base_w));
    let dx = dy.conv_transpose2d(w, p.padding, out_pad, p.stride, 1)?;
    dx.narrow(2, 0, x_hw.0)?.narrow(3, 0, x_hw.1)
}

/// dw = conv(xᵀ, dyᵀ) with the stride as dilation, narrowed to the kernel size.
fn cpu_conv_bwd_filter(p: ConvParams, x: &Tensor, dy: &Tensor, k_hw: (usize, usize)) -> Result<Tensor> {
    if let Some(dw) = crate::cpu_conv::conv2d_backward_filter(x, dy, k_hw, p.padding, p.stride)? {
        return Ok(dw);
    }
    let dw = x
        .transpose(0, 1)?
        .conv2d(&dy.transpose(0, 1)?.contiguous()?, p.padding, 1, p.stride, 1)?
        .transpose(0, 1)?;
    dw.narrow(2, 0, k_hw.0)?.narrow(3, 0, k_hw.1)?.contiguous()
}

/// One plane of the max-pool backward: `dx` (h × w, zeroed) from `xs` (h × w) and `gs`
/// (oh × ow); each window's gradient goes to its first maximum, a NaN wins and stays.
fn pool_bwd_plane<T: Copy + PartialOrd + std::ops::AddAssign>(
    xs: &[T],
    gs: &[T],
    dx: &mut [T],
    (w, oh, ow): (usize, usize, usize),
    is_nan: impl Fn(T) -> bool,
) {
    for i in 0..oh {
        for j in 0..ow {
            let mut best = 2 * i * w + 2 * j;
            for (di, dj) in [(0, 1), (1, 0), (1, 1)] {
                let at = (2 * i + di) * w + 2 * j + dj;
                // NaN wins (propagated) and stays; otherwise strictly greater replaces.
                if !is_nan(xs[best]) && (xs[at] > xs[best] || is_nan(xs[at])) {
                    best = at;
                }
            }
            dx[best] += gs[i * ow + j];
        }
    }
}

/// The f32 max-pool backward of contiguous NCHW `xs` (n·c planes of h × w) and `gs` (planes
/// of oh × ow), planes in parallel.
fn pool_bwd_f32(xs: &[f32], gs: &[f32], (h, w): (usize, usize), (oh, ow): (usize, usize)) -> Vec<f32> {
    use rayon::prelude::*;
    let mut dx = vec![0f32; xs.len()];
    if h * w > 0 {
        dx.par_chunks_mut(h * w)
            .zip(xs.par_chunks(h * w))
            .zip(gs.par_chunks((oh * ow).max(1)))
            .for_each(|((d, xp), gp)| pool_bwd_plane(xp, gp, d, (w, oh, ow), f32::is_nan));
    }
    dx
}

/// The f32 2×2 max-pool (stride 2) of contiguous NCHW `x` (planes of h × w, both at least 2),
/// planes in parallel: candle's `max_pool2d` loop (each window starts from its first value,
/// which any larger value replaces; so a NaN is kept only in the first place) on all threads
/// instead of one, as branch-free selects the compiler vectorises ([`pool_rows`]).
fn pool_fwd_f32(x: &[f32], (h, w): (usize, usize)) -> Vec<f32> {
    use rayon::prelude::*;
    let (oh, ow) = (h / 2, w / 2);
    let fast = crate::cpu_features::avx2();
    let mut y = Vec::<f32>::with_capacity(x.len() / (h * w) * oh * ow);
    let planes = y.spare_capacity_mut();
    planes
        .par_chunks_mut(oh * ow)
        .zip(x.par_chunks(h * w))
        .for_each(|(yp, xp)| {
            for (i, row) in yp.chunks_exact_mut(ow).enumerate() {
                let (top, bottom) = (&xp[2 * i * w..(2 * i + 1) * w], &xp[(2 * i + 1) * w..(2 * i + 2) * w]);
                #[cfg(target_arch = "x86_64")]
                if fast {
                    // SAFETY: `cpu_features::avx2()` found AVX2 on this CPU
                    unsafe { avx2::pool_rows(top, bottom, row) };
                    continue;
                }
                let _ = fast; // (never set on other targets)
                pool_rows(top, bottom, row);
            }
        });
    let n = planes.len();
    // SAFETY: every window of every plane wrote its output just above
    unsafe { y.set_len(n) };
    y
}

/// One row of 2×2 windows of [`pool_fwd_f32`]: `out[j]` = the maximum of `top[2j..2j + 2]`
/// and `bottom[2j..2j + 2]`, found in that order (a larger value replaces).
#[inline(always)]
fn pool_rows(top: &[f32], bottom: &[f32], out: &mut [std::mem::MaybeUninit<f32>]) {
    let n = out.len();
    let (top, bottom) = (&top[..2 * n], &bottom[..2 * n]);
    for (j, o) in out.iter_mut().enumerate() {
        let mut m = top[2 * j];
        for v in [top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]] {
            m = if v > m { v } else { m };
        }
        o.write(m);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The CPU pooling loops compiled for AVX2 (the same code, vectorised 8 wide); callers
    //! check [`crate::cpu_features::avx2`] first.
    use std::mem::MaybeUninit;

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pool_rows(top: &[f32], bottom: &[f32], out: &mut [MaybeUninit<f32>]) {
        super::pool_rows(top, bottom, out)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn relu_pool_rows(
        top: &[f32],
        bottom: &[f32],
        g: &[f32],
        dt: &mut [MaybeUninit<f32>],
        db: &mut [MaybeUninit<f32>],
    ) {
        super::fused::relu_pool_rows(top, bottom, g, dt, db)
    }
}

/// NCHW sizes (n, c, h, w).
type Dims4 = (usize, usize, usize, usize);

/// The contiguous f32 slice and NCHW dims of a storage, when the pooling twins take it.
fn f32_planes<'a>(s: &'a CpuStorage, l: &Layout) -> Option<(&'a [f32], Dims4)> {
    let (CpuStorage::F32(v), Some((a, b))) = (s, l.contiguous_offsets()) else {
        return None;
    };
    Some((&v[a..b], l.shape().dims4().ok()?))
}

/// 2×2 max-pool of a CPU tensor: [`pool_fwd_f32`] for contiguous f32 NCHW inputs of at least
/// 2×2, candle's `max_pool2d` otherwise (same values).
pub(crate) fn cpu_max_pool2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if x.dtype() == DType::F32 && x.is_contiguous() && h >= 2 && w >= 2 {
        let (s, l) = x.storage_and_layout();
        if let candle_core::Storage::Cpu(s) = &*s {
            if let Some((v, _)) = f32_planes(s, l) {
                return Tensor::from_vec(pool_fwd_f32(v, (h, w)), (n, c, h / 2, w / 2), &Device::Cpu);
            }
        }
    }
    x.max_pool2d(2)
}

/// Max-pool backward on CPU: each window's gradient goes to its first maximum (a NaN wins and
/// stays). f32 runs in f32 ([`pool_bwd_f32`]; a 2×2 window with stride 2 gives each input at
/// most one gradient, so nothing is summed and the result is the same as in f64), other dtypes
/// in f64.
fn cpu_pool_bwd(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let (n, c, h, w) = x.dims4()?;
    let (_, _, oh, ow) = dy.dims4()?;
    if oh * 2 > h || ow * 2 > w {
        candle_core::bail!("max-pool backward: {oh}×{ow} windows do not fit {h}×{w}");
    }
    let (hw, ohw) = (h * w, oh * ow);
    if dtype == DType::F32 {
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let gs = dy.flatten_all()?.to_vec1::<f32>()?;
        return Tensor::from_vec(pool_bwd_f32(&xs, &gs, (h, w), (oh, ow)), (n, c, h, w), &Device::Cpu);
    }
    let xs = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let gs = dy.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let mut dx = vec![0f64; xs.len()];
    for p in 0..n * c {
        pool_bwd_plane(
            &xs[p * hw..(p + 1) * hw],
            &gs[p * ohw..(p + 1) * ohw],
            &mut dx[p * hw..(p + 1) * hw],
            (w, oh, ow),
            f64::is_nan,
        );
    }
    Tensor::from_vec(dx, (n, c, h, w), &Device::Cpu)?.to_dtype(dtype)
}

// ---------------------------------------------------------------------------------------------
// The custom ops.

#[cfg(not(feature = "cudnn"))]
fn no_backend(name: &str) -> candle_core::Error {
    candle_core::Error::Cuda(
        format!("{name}: this build has no cuDNN backend (build gz-model with the `cudnn` feature)").into(),
    )
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "gz-cudnn-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = self.0;
        if let Some(y) = crate::cpu_conv::forward_storage((s1, l1), (s2, l2), Some((s3, l3)), p.padding, p.stride)? {
            return Ok(y);
        }
        let y = cpu_conv_fwd(p, &cpu_tensor(s1, l1)?, &cpu_tensor(s2, l2)?, &cpu_tensor(s3, l3)?)?;
        cpu_storage(&y)
    }

    #[allow(unused_variables, reason = "the arguments are only used with the cudnn feature")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cudnn")]
        {
            let (n, _, h, w) = l1.shape().dims4()?;
            let (k, _, kh, kw) = l2.shape().dims4()?;
            let shape = Shape::from((n, k, self.0.out_dim(h, kh), self.0.out_dim(w, kw)));
            let y = backend::conv_fwd(self.0, s1, l1, s2, l2, Some((s3, l3)), &shape)?;
            Ok((y, shape))
        }
        #[cfg(not(feature = "cudnn"))]
        Err(no_backend(self.name()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (dx, dw) = conv_grads(self.0, x, w, &dy)?;
        let db = dy.apply_op1_no_bwd(&BiasGrad)?;
        Ok((dx, grad_sink::divert(w, dw), grad_sink::divert(b, db)))
    }
}

impl CustomOp2 for Conv2dNoBiasOp {
    fn name(&self) -> &'static str {
        "gz-cudnn-conv2d-nobias"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let nhwc = self.0.nhwc;
        let x = cpu_in(cpu_tensor(s1, l1)?, nhwc)?;
        let w = cpu_in(cpu_tensor(s2, l2)?, nhwc)?;
        let y = cpu_conv(self.0, &x, &w, None)?;
        cpu_storage(&cpu_out(y, nhwc)?)
    }

    #[allow(unused_variables, reason = "the arguments are only used with the cudnn feature")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cudnn")]
        {
            let (n, _, h, w) = nchw_dims(l1.shape(), self.0.nhwc)?;
            let (k, _, kh, kw) = nchw_dims(l2.shape(), self.0.nhwc)?;
            let shape = shape_of(n, k, self.0.out_dim(h, kh), self.0.out_dim(w, kw), self.0.nhwc);
            let y = backend::conv_fwd(self.0, s1, l1, s2, l2, None, &shape)?;
            Ok((y, shape))
        }
        #[cfg(not(feature = "cudnn"))]
        Err(no_backend(self.name()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = conv_grads(self.0, x, w, &dy.contiguous()?)?;
        Ok((dx, grad_sink::divert(w, dw)))
    }
}

/// The gradients of a convolution's input and weight from the output gradient `dy`
/// (contiguous), through the backward-data and backward-filter ops. The input's gradient is
/// computed only when the input is part of the graph (`x.track_op()`): the image layer's
/// backward-data, a full-resolution transposed convolution whose result candle would drop, is
/// skipped (the tower op's own backward pass skips it the same way).
fn conv_grads(p: ConvParams, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Tensor)> {
    let (_, _, h, wd) = nchw_dims(x.shape(), p.nhwc)?;
    let (_, _, kh, kw) = nchw_dims(w.shape(), p.nhwc)?;
    let dx = if x.track_op() {
        Some(dy.apply_op2_no_bwd(w, &ConvBwdData { p, x_hw: (h, wd) })?)
    } else {
        None
    };
    let dw = x.apply_op2_no_bwd(dy, &ConvBwdFilter { p, k_hw: (kh, kw) })?;
    Ok((dx, dw))
}

impl CustomOp2 for ConvBwdData {
    fn name(&self) -> &'static str {
        "gz-cudnn-conv2d-bwd-data"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let nhwc = self.p.nhwc;
        if !nhwc {
            let p = self.p;
            if let Some(dx) =
                crate::cpu_conv::backward_data_storage((s1, l1), (s2, l2), self.x_hw, p.padding, p.stride)?
            {
                return Ok(dx);
            }
        }
        let dy = cpu_in(cpu_tensor(s1, l1)?, nhwc)?;
        let w = cpu_in(cpu_tensor(s2, l2)?, nhwc)?;
        let dx = cpu_conv_bwd_data(self.p, &dy, &w, self.x_hw)?;
        cpu_storage(&cpu_out(dx, nhwc)?)
    }

    #[allow(unused_variables, reason = "the arguments are only used with the cudnn feature")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cudnn")]
        {
            let (n, _, _, _) = nchw_dims(l1.shape(), self.p.nhwc)?;
            let (_, c, _, _) = nchw_dims(l2.shape(), self.p.nhwc)?;
            let shape = shape_of(n, c, self.x_hw.0, self.x_hw.1, self.p.nhwc);
            let dx = backend::conv_bwd_data(self.p, s1, l1, s2, l2, &shape)?;
            Ok((dx, shape))
        }
        #[cfg(not(feature = "cudnn"))]
        Err(no_backend(self.name()))
    }
}

impl CustomOp2 for ConvBwdFilter {
    fn name(&self) -> &'static str {
        "gz-cudnn-conv2d-bwd-filter"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let nhwc = self.p.nhwc;
        if !nhwc {
            let p = self.p;
            if let Some(dw) =
                crate::cpu_conv::backward_filter_storage((s1, l1), (s2, l2), self.k_hw, p.padding, p.stride)?
            {
                return Ok(dw);
            }
        }
        let x = cpu_in(cpu_tensor(s1, l1)?, nhwc)?;
        let dy = cpu_in(cpu_tensor(s2, l2)?, nhwc)?;
        let dw = cpu_conv_bwd_filter(self.p, &x, &dy, self.k_hw)?;
        cpu_storage(&cpu_out(dw, nhwc)?)
    }

    #[allow(unused_variables, reason = "the arguments are only used with the cudnn feature")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cudnn")]
        {
            let (_, c, _, _) = nchw_dims(l1.shape(), self.p.nhwc)?;
            let (_, k, _, _) = nchw_dims(l2.shape(), self.p.nhwc)?;
            let shape = shape_of(k, c, self.k_hw.0, self.k_hw.1, self.p.nhwc);
            let dw = backend::conv_bwd_filter(self.p, s1, l1, s2, l2, &shape)?;
            Ok((dw, shape))
        }
        #[cfg(not(feature = "cudnn"))]
        Err(no_backend(self.name()))
    }
}

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "gz-cudnn-bias-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if let Some(dy) = crate::cpu_conv::f32_view(s, l) {
            // f32: per channel, the planes of every image summed in f64 (channels in parallel)
            use rayon::prelude::*;
            let (n, k, h, w) = l.shape().dims4()?;
            let hw = h * w;
            let db: Vec<f32> = (0..k)
                .into_par_iter()
                .map(|c| {
                    (0..n)
                        .map(|i| {
                            dy[(i * k + c) * hw..(i * k + c + 1) * hw]
                                .iter()
                                .map(|&v| f64::from(v))
                                .sum::<f64>()
                        })
                        .sum::<f64>() as f32
                })
                .collect();
            return Ok((CpuStorage::F32(db), Shape::from(k)));
        }
        let dy = cpu_tensor(s, l)?;
        // Accumulate in f32 at least, as cuDNN does.
        let acc = if dy.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let db = dy.to_dtype(acc)?.sum((0, 2, 3))?.to_dtype(dy.dtype())?;
        cpu_storage(&db)
    }

    #[allow(unused_variables, reason = "the arguments are only used with the cudnn feature")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cudnn")]
        {
            let (_, k, _, _) = l.shape().dims4()?;
            let db = backend::bias_grad(s, l, k)?;
            Ok((db, Shape::from(k)))
        }
        #[cfg(not(feature = "cudnn"))]
        Err(no_backend(self.name()))
    }
}

impl CustomOp1 for MaxPool2Op {
    fn name(&self) -> &'static str {
        "gz-cudnn-max-pool2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        // NCHW f32 in place (no copies in and out), planes in parallel
        if let (false, Some((x, (n, c, h, w)))) = (self.nhwc, f32_planes(s, l)) {
            if h >= 2 && w >= 2 {
                return Ok((
                    CpuStorage::F32(pool_fwd_f32(x, (h, w))),
                    Shape::from((n, c, h / 2, w / 2)),
                ));
            }
        }
        let y = cpu_max_pool2(&cpu_in(cpu_tensor(s, l)?, self.nhwc)?)?;
        cpu_storage(&cpu_out(y, self.nhwc)?)
    }

    #[allow(unused_variables, reason = "the arguments are only used with the cudnn feature")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cudnn")]
        {
            let (n, c, h, w) = nchw_dims(l.shape(), self.nhwc)?;
            let shape = shape_of(n, c, h / 2, w / 2, self.nhwc);
            let y = backend::pool_fwd(s, l, &shape, self.nhwc)?;
            Ok((y, shape))
        }
        #[cfg(not(feature = "cudnn"))]
        Err(no_backend(self.name()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        Ok(Some(x.apply_op3_no_bwd(y, &dy, &MaxPool2Bwd { nhwc: self.nhwc })?))
    }
}

impl CustomOp3 for MaxPool2Bwd {
    fn name(&self) -> &'static str {
        "gz-cudnn-max-pool2-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // NCHW f32 in place (no copies in and out)
        if let (false, Some((x, (n, c, h, w))), Some((g, (gn, gc, oh, ow)))) =
            (self.nhwc, f32_planes(s1, l1), f32_planes(s3, l3))
        {
            if (gn, gc) == (n, c) && oh * 2 <= h && ow * 2 <= w {
                return Ok((
                    CpuStorage::F32(pool_bwd_f32(x, g, (h, w), (oh, ow))),
                    l1.shape().clone(),
                ));
            }
        }
        let x = cpu_in(cpu_tensor(s1, l1)?, self.nhwc)?;
        let dy = cpu_in(cpu_tensor(s3, l3)?, self.nhwc)?;
        cpu_storage(&cpu_out(cpu_pool_bwd(&x, &dy)?, self.nhwc)?)
    }

    #[allow(unused_variables, reason = "the arguments are only used with the cudnn feature")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cudnn")]
        {
            let shape = l1.shape().clone();
            let dx = backend::pool_bwd(s1, l1, s2, l2, s3, l3, self.nhwc)?;
            Ok((dx, shape))
        }
        #[cfg(not(feature = "cudnn"))]
        Err(no_backend(self.name()))
    }
}
