//! Fused bias + ReLU, the epilogue of every convolution in both nets, as one candle custom op.
//!
//! Unfused, candle spends four to six kernels per convolution on it: a broadcast bias add, the
//! ReLU, and in the backward pass the ReLU mask, its product with the gradient and a strided
//! reduction over (N, H, W) for the bias gradient — and cuDNN's own bias calls refuse bf16.
//! Fused ([`bias_relu`]), the forward pass is one kernel (`y = max(z + b, 0)`) and the backward
//! pass two: one pass over (y, dy) that writes `dz = dy · [y > 0]` and per-(channel, split)
//! partial sums, and one tiny kernel that adds the partials of each channel in a fixed order
//! (deterministic, no atomics). The backward op returns `dz` and `db` packed in one buffer, which
//! the autograd hook splits into two zero-copy views.
//!
//! The kernels are in `src/kernels/bias_relu.cu` (PTX built by `build.rs` with the `cuda`
//! feature); math is f32 for every storage type. On CPU (and in builds without the `cudnn`
//! feature) the same op runs candle's tensor ops, so CPU tests check the plumbing and the
//! gradient formulas against candle's own `broadcast_add(..).relu()`.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::{cpu_storage, cpu_tensor};
use crate::grad_sink;

/// `max(z + b, 0)` with `b` broadcast over channels: `z` (N,K,H,W), `b` (K), same dtype and
/// device. Differentiable with respect to both.
pub fn bias_relu(z: &Tensor, b: &Tensor) -> Result<Tensor> {
    bias_relu_in(z, b, false)
}

/// [`bias_relu`] for a channels-last `z` (N, H, W, K).
pub(crate) fn bias_relu_nhwc(z: &Tensor, b: &Tensor) -> Result<Tensor> {
    bias_relu_in(z, b, true)
}

fn bias_relu_in(z: &Tensor, b: &Tensor, nhwc: bool) -> Result<Tensor> {
    let (_, c1, _, c3) = z.dims4()?;
    let k = if nhwc { c3 } else { c1 };
    if b.dims() != [k] {
        candle_core::bail!("bias_relu: bias shape {:?} does not match {k} channels", b.dims());
    }
    if z.dtype() != b.dtype() {
        candle_core::bail!("bias_relu: dtypes differ (z {:?}, b {:?})", z.dtype(), b.dtype());
    }
    if !matches!(z.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        candle_core::bail!("bias_relu supports f32, bf16 and f16, not {:?}", z.dtype());
    }
    z.contiguous()?.apply_op2(&b.contiguous()?, BiasRelu { nhwc })
}

/// `relu(conv(x, w) + b)` as one custom op (x, w, b) → y, in either layout (see
/// [`super::conv2d_relu`]). One graph node instead of two (the convolution, then
/// [`bias_relu`]): the pre-activation `z` is a temporary of the forward pass, not a tensor the
/// graph keeps until the backward pass, and candle's autograd, which starts every gradient it
/// accumulates from a fresh zero tensor and adds to it, has one activation-sized gradient fewer
/// to zero and add per layer. The backward pass is the same kernels as before: [`BiasReluBwd`]
/// on (y, dy) for dz and db, then cuDNN's backward-data and backward-filter on dz.
pub(super) struct ConvBiasRelu(pub(super) super::ConvParams);

impl candle_core::CustomOp3 for ConvBiasRelu {
    fn name(&self) -> &'static str {
        "gz-conv2d-bias-relu"
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
        if let Some((y, shape)) = cpu_conv_bias_relu_f32(self.0, (s1, l1), (s2, l2), (s3, l3))? {
            return Ok((CpuStorage::F32(y), shape));
        }
        let y = cpu_conv_bias_relu(self.0, (s1, l1), (s2, l2), (s3, l3))?;
        cpu_storage(&super::cpu_out(y, self.0.nhwc)?)
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
            let p = self.0;
            let (n, _, h, w) = super::nchw_dims(l1.shape(), p.nhwc)?;
            let (k, _, kh, kw) = super::nchw_dims(l2.shape(), p.nhwc)?;
            let shape = super::shape_of(n, k, p.out_dim(h, kh), p.out_dim(w, kw), p.nhwc);
            // z lives only until the epilogue has read it
            let z = super::backend::conv_fwd(p, s1, l1, s2, l2, None, &shape)?;
            cuda::forward(&z, &Layout::contiguous(shape), s3, l3, p.nhwc)
        }
        #[cfg(not(feature = "cudnn"))]
        Err(super::no_backend(self.name()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dz, db) = relu_grads(self.0.nhwc, b, y, dy)?;
        let (dx, dw) = super::conv_grads(self.0, x, w, &dz)?;
        Ok((dx, grad_sink::divert(w, dw), grad_sink::divert(b, db)))
    }
}

/// `max_pool2(relu(conv(x, w) + b))` as one custom op (x, w, b) → p, in either layout (see
/// [`super::conv2d_relu_pool`]): the pooled layers of both nets. The forward pass is cuDNN's
/// convolution, then one kernel writing the ReLU output `y` and its 2×2 max-pool; `y` (which the
/// pooling backward needs) is kept inside the op, not as a graph node, and the backward pass is
/// one kernel over
/// (y, dp) that routes each window's gradient to its first maximum and through the ReLU and
/// sums the bias gradient (then the usual deterministic finish and cuDNN's convolution
/// backward). Compared with conv → bias + ReLU → pool as separate nodes, the backward pass no
/// longer writes the pool's gradient `dy`, zero-fills and adds it in candle's autograd, and
/// reads it again for the ReLU mask.
///
/// With [`set_pool_mask`] and channels-last, the forward pass keeps one byte per (pooled window,
/// channel) in place of `y` ([`PoolSaved::Mask`]), where the vectorised kernels take the layer.
pub(super) struct ConvBiasReluPool {
    pub(super) p: super::ConvParams,
    /// Whether the forward pass keeps the pooling mask instead of `y` (channels-last only).
    mask: bool,
    /// What the forward pass kept for the backward pass (detached).
    saved: std::sync::Mutex<Option<PoolSaved>>,
}

/// What the forward pass of a pooled layer keeps for its backward pass.
#[derive(Clone)]
pub(super) enum PoolSaved {
    /// The ReLU output before the pooling, in the layer's layout.
    Relu(Tensor),
    /// Channels-last only: (N, H/2, W/2, K) bytes, each the tap of its window (0–3, row-major)
    /// that holds the window's first maximum where that maximum is positive, else
    /// [`POOL_NONE`] ([`set_pool_mask`]); `hw` is the unpooled (H, W).
    Mask { mask: Tensor, hw: (usize, usize) },
}

/// A pooling mask's byte for a window that passes no gradient (its maximum is not positive).
pub(super) const POOL_NONE: u8 = 4;

impl ConvBiasReluPool {
    pub(super) fn new(p: super::ConvParams) -> Self {
        Self {
            p,
            mask: p.nhwc && pool_mask(),
            saved: std::sync::Mutex::new(None),
        }
    }

    fn save(&self, y: PoolSaved) -> Result<()> {
        *self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("conv-relu-pool: saved activation lock poisoned".into()))? = Some(y);
        Ok(())
    }

    /// What the last forward pass saved (for callers that run the op without a graph node and
    /// do the backward pass themselves, [`super::tower()`]).
    pub(super) fn saved(&self) -> Result<PoolSaved> {
        self.saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("conv-relu-pool: saved activation lock poisoned".into()))?
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("conv-relu-pool: backward before forward".into()))
    }
}

impl candle_core::CustomOp3 for ConvBiasReluPool {
    fn name(&self) -> &'static str {
        "gz-conv2d-bias-relu-pool"
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
        let p = self.p;
        if let Some((y, shape)) = cpu_conv_bias_relu_f32(p, (s1, l1), (s2, l2), (s3, l3))? {
            let (n, k, h, w) = shape.dims4()?;
            if h >= 2 && w >= 2 {
                // (NCHW: the mask is channels-last only)
                let pooled = super::pool_fwd_f32(&y, (h, w));
                self.save(PoolSaved::Relu(Tensor::from_vec(y, shape, &candle_core::Device::Cpu)?))?;
                return Ok((CpuStorage::F32(pooled), Shape::from((n, k, h / 2, w / 2))));
            }
        }
        let y = cpu_conv_bias_relu(p, (s1, l1), (s2, l2), (s3, l3))?;
        let pooled = super::cpu_max_pool2(&y)?;
        let (_, _, h, w) = y.dims4()?;
        let y = super::cpu_out(y, p.nhwc)?;
        self.save(if self.mask {
            PoolSaved::Mask {
                mask: cpu_pool_mask(&y)?,
                hw: (h, w),
            }
        } else {
            PoolSaved::Relu(y)
        })?;
        cpu_storage(&super::cpu_out(pooled, p.nhwc)?)
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
            let p = self.p;
            let (n, _, h, w) = super::nchw_dims(l1.shape(), p.nhwc)?;
            let (k, _, kh, kw) = super::nchw_dims(l2.shape(), p.nhwc)?;
            let (oh, ow) = (p.out_dim(h, kh), p.out_dim(w, kw));
            let y_shape = super::shape_of(n, k, oh, ow, p.nhwc);
            let z = super::backend::conv_fwd(p, s1, l1, s2, l2, None, &y_shape)?;
            let z_layout = Layout::contiguous(y_shape.clone());
            let p_shape = super::shape_of(n, k, oh / 2, ow / 2, p.nhwc);
            let stored = |s: CudaStorage, shape: Shape| {
                Tensor::from_storage(
                    candle_core::Storage::Cuda(s),
                    shape,
                    candle_core::op::BackpropOp::none(),
                    false,
                )
            };
            // the epilogue, the pooling and the mask in one pass over z, where the vectorised
            // kernels take the layer
            if self.mask {
                if let Some((pooled, mask)) = cuda::forward_pool_mask(&z, &z_layout, s3, l3)? {
                    self.save(PoolSaved::Mask {
                        mask: stored(mask, p_shape.clone()),
                        hw: (oh, ow),
                    })?;
                    return Ok((pooled, p_shape));
                }
            }
            // the epilogue and the pooling in one pass over z
            let (y, pooled) = cuda::forward_pool(&z, &z_layout, s3, l3, p.nhwc)?;
            drop(z);
            self.save(PoolSaved::Relu(stored(y, y_shape)))?;
            Ok((pooled, p_shape))
        }
        #[cfg(not(feature = "cudnn"))]
        Err(super::no_backend(self.name()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _pooled: &Tensor,
        dp: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dz, db) = relu_pool_grads_from(self.p.nhwc, b, &self.saved()?, dp)?;
        let (dx, dw) = super::conv_grads(self.p, x, w, &dz)?;
        Ok((dx, grad_sink::divert(w, dw), grad_sink::divert(b, db)))
    }
}

/// Backward of ReLU + 2×2 max-pool: (y, dp) → [dz (y's elements), db (K values)], flat.
struct ReluPoolBwd {
    nhwc: bool,
}

impl CustomOp2 for ReluPoolBwd {
    fn name(&self) -> &'static str {
        "gz-relu-pool-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        // the pool's gradient (first maximum of each window), then the ReLU's
        if let (false, Some((y, (n, k, h, w))), Some((dp, (dn, dk, oh, ow)))) =
            (self.nhwc, super::f32_planes(s1, l1), super::f32_planes(s2, l2))
        {
            if (dn, dk) == (n, k) && 2 * oh <= h && 2 * ow <= w && !y.is_empty() {
                return Ok(relu_pool_grads_f32(y, dp, k, (h, w), (oh, ow)));
            }
        }
        let y = cpu_tensor(s1, l1)?;
        let dp = super::cpu_in(cpu_tensor(s2, l2)?, self.nhwc)?;
        let dy = super::cpu_pool_bwd(&super::cpu_in(y.clone(), self.nhwc)?, &dp)?;
        cpu_relu_grads(&y, &super::cpu_out(dy, self.nhwc)?, self.nhwc)
    }

    #[allow(unused_variables, reason = "the arguments are only used with the cudnn feature")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cudnn")]
        {
            cuda::pool_backward(s1, l1, s2, l2, self.nhwc)
        }
        #[cfg(not(feature = "cudnn"))]
        Err(super::no_backend(self.name()))
    }
}

/// dz and db of `y = relu(z + b)` from (y, dy), through [`BiasReluBwd`]: one packed buffer,
/// split into two zero-copy views (dz is contiguous from offset 0).
pub(super) fn relu_grads(nhwc: bool, b: &Tensor, y: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let packed = y.apply_op2_no_bwd(&dy.contiguous()?, &BiasReluBwd { nhwc })?;
    unpack(&packed, y, b)
}

/// dz and db of `p = max_pool2(relu(z + b))` from the ReLU output `y` and dp, through
/// [`ReluPoolBwd`] (one kernel on CUDA).
pub(super) fn relu_pool_grads(nhwc: bool, b: &Tensor, y: &Tensor, dp: &Tensor) -> Result<(Tensor, Tensor)> {
    let packed = y.apply_op2_no_bwd(&dp.contiguous()?, &ReluPoolBwd { nhwc })?;
    unpack(&packed, y, b)
}

/// [`relu_pool_grads`] from what the forward pass kept: the ReLU output or the pooling mask.
pub(super) fn relu_pool_grads_from(nhwc: bool, b: &Tensor, kept: &PoolSaved, dp: &Tensor) -> Result<(Tensor, Tensor)> {
    match kept {
        PoolSaved::Relu(y) => relu_pool_grads(nhwc, b, y, dp),
        PoolSaved::Mask { mask, hw } => {
            if !nhwc {
                candle_core::bail!("relu-pool backward: a pooling mask is channels-last only");
            }
            // the kernel loads dp 16 bytes at a time: a strided view, or one starting off a
            // 16-byte boundary of its buffer, is copied to a fresh (aligned) one
            let aligned = (dp.layout().start_offset() * dp.dtype().size_in_bytes()) % 16 == 0;
            let dp = if dp.is_contiguous() && aligned {
                dp.clone()
            } else {
                dp.force_contiguous()?
            };
            let packed = mask.apply_op2_no_bwd(&dp, &ReluPoolMaskBwd { hw: *hw })?;
            let (n, _, _, k) = mask.dims4()?;
            unpack_shape(&packed, &Shape::from((n, hw.0, hw.1, k)), b)
        }
    }
}

/// A backward op's packed [dz (y's elements), db (b's)] as two views: dz shaped like `y`.
fn unpack(packed: &Tensor, y: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    unpack_shape(packed, y.shape(), b)
}

/// [`unpack`] with dz shaped `shape`.
fn unpack_shape(packed: &Tensor, shape: &Shape, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let total = shape.elem_count();
    let dz = packed.narrow(0, 0, total)?.reshape(shape)?;
    let db = packed.narrow(0, total, b.elem_count())?;
    Ok((dz, db))
}

/// Backward of ReLU + 2×2 max-pool from the pooling mask (channels-last): (mask, dp) →
/// [dz (N·H·W·K values), db (K)], flat, in dp's dtype; `hw` the unpooled (H, W).
struct ReluPoolMaskBwd {
    hw: (usize, usize),
}

impl CustomOp2 for ReluPoolMaskBwd {
    fn name(&self) -> &'static str {
        "gz-relu-pool-mask-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let mask = cpu_tensor(s1, l1)?;
        let dp = cpu_tensor(s2, l2)?;
        let dz = cpu_pool_mask_bwd(&mask, &dp, self.hw)?;
        let db = dz.to_dtype(DType::F32)?.sum((0, 1, 2))?.to_dtype(dz.dtype())?;
        cpu_storage(&Tensor::cat(&[dz.flatten_all()?, db], 0)?)
    }

    #[allow(unused_variables, reason = "the arguments are only used with the cudnn feature")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cudnn")]
        {
            cuda::pool_backward_mask(s1, l1, s2, l2, self.hw)
        }
        #[cfg(not(feature = "cudnn"))]
        Err(super::no_backend(self.name()))
    }
}

/// The pooling mask of a channels-last ReLU output `y` (N, H, W, K) on the CPU: for each 2×2
/// window inside the map and each channel, the tap of the first maximum (a strictly larger value
/// replaces, row-major) where it is positive, else [`POOL_NONE`]; (N, H/2, W/2, K) u8. The rule
/// of the pooling backward pass ([`relu_pool_rows`], the kernels' relu_pool_window).
pub(super) fn cpu_pool_mask(y: &Tensor) -> Result<Tensor> {
    let (n, h, w, k) = y.dims4()?;
    let (oh, ow) = (h / 2, w / 2);
    let v = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut mask = Vec::with_capacity(n * oh * ow * k);
    for img in 0..n {
        for i in 0..oh {
            for j in 0..ow {
                let at = |di: usize, dj: usize, c: usize| v[((img * h + 2 * i + di) * w + 2 * j + dj) * k + c];
                for c in 0..k {
                    let taps = [at(0, 0, c), at(0, 1, c), at(1, 0, c), at(1, 1, c)];
                    let (mut best, mut best_v) = (0u8, taps[0]);
                    for (t, &tv) in (1u8..).zip(&taps[1..]) {
                        if tv > best_v {
                            (best, best_v) = (t, tv);
                        }
                    }
                    mask.push(if best_v > 0.0 { best } else { POOL_NONE });
                }
            }
        }
    }
    Tensor::from_vec(mask, (n, oh, ow, k), &candle_core::Device::Cpu)
}

/// The gradient of a channels-last ReLU output (N, H, W, K) from its pooling mask and the pooled
/// gradient `dp` (both (N, H/2, W/2, K)), in dp's dtype: each window's gradient at the tap its
/// byte names, 0 everywhere else.
fn cpu_pool_mask_bwd(mask: &Tensor, dp: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
    let (n, oh, ow, k) = mask.dims4()?;
    if dp.dims() != mask.dims() || (oh, ow) != (h / 2, w / 2) {
        candle_core::bail!(
            "relu-pool backward: mask {:?}, dp {:?} and a {h}×{w} map do not match",
            mask.dims(),
            dp.dims()
        );
    }
    let m = mask.flatten_all()?.to_vec1::<u8>()?;
    let g = dp.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut dz = vec![0f32; n * h * w * k];
    for (at, (&t, &gv)) in m.iter().zip(&g).enumerate() {
        let (c, r) = (at % k, at / k);
        let (img, q) = (r / (oh * ow), r % (oh * ow));
        let (i, j) = (q / ow, q % ow);
        match t {
            0..=3 => {
                let (di, dj) = (usize::from(t / 2), usize::from(t % 2));
                dz[((img * h + 2 * i + di) * w + 2 * j + dj) * k + c] = gv;
            }
            POOL_NONE => {}
            other => candle_core::bail!("relu-pool backward: a pooling mask byte is {other} (0 to {POOL_NONE})"),
        }
    }
    Tensor::from_vec(dz, (n, h, w, k), &candle_core::Device::Cpu)?.to_dtype(dp.dtype())
}

/// `relu(conv(x, w) + b)` on the CPU from the op's storages, NCHW (inputs in the op's layout).
fn cpu_conv_bias_relu(
    p: super::ConvParams,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<Tensor> {
    let x = super::cpu_in(cpu_tensor(s1, l1)?, p.nhwc)?;
    let w = super::cpu_in(cpu_tensor(s2, l2)?, p.nhwc)?;
    let b = cpu_tensor(s3, l3)?;
    super::cpu_conv(p, &x, &w, Some(&b))?.relu()
}

/// [`cpu_conv_bias_relu`] for f32 NCHW storages, in one vector: gz's CPU convolution
/// ([`crate::cpu_conv::forward_storage`], bias included), then the ReLU in place, in parallel;
/// `None` where that convolution does not take the storages (the caller falls back).
fn cpu_conv_bias_relu_f32(
    p: super::ConvParams,
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    b: (&CpuStorage, &Layout),
) -> Result<Option<(Vec<f32>, Shape)>> {
    use rayon::prelude::*;
    if p.nhwc {
        return Ok(None);
    }
    let Some((CpuStorage::F32(mut y), shape)) = crate::cpu_conv::forward_storage(x, w, Some(b), p.padding, p.stride)?
    else {
        return Ok(None);
    };
    // candle's f32 ReLU: `max(v, 0)` (a NaN becomes 0)
    y.par_chunks_mut(1 << 14)
        .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
    Ok(Some((y, shape)))
}

/// The packed [dz, db] of the backward ops for f32 NCHW `y` (the ReLU output) and `dy` (the
/// gradient reaching it), `k` channels of `hw` values per image: dz = dy where y > 0, else 0.
fn relu_grads_f32(y: &[f32], dy: &[f32], k: usize, hw: usize) -> (CpuStorage, Shape) {
    packed_grads_f32(y.len(), k, hw, |plane, d| {
        let range = plane * hw..(plane + 1) * hw;
        for ((d, &yv), &g) in d.iter_mut().zip(&y[range.clone()]).zip(&dy[range]) {
            d.write(if yv > 0.0 { g } else { 0.0 });
        }
    })
}

/// The packed [dz, db] of ReLU + 2×2 max-pool for f32 NCHW `y` (the ReLU output, planes of
/// h × w) and `dp` (the gradient reaching the pooled output, planes of oh × ow, 2·oh ≤ h,
/// 2·ow ≤ w) in one pass per plane: each window's gradient goes to its first maximum
/// ([`relu_pool_plane`]) and through the ReLU. The same values as the pool's backward pass
/// followed by [`relu_grads_f32`], to the bit, without the intermediate gradient's buffer.
fn relu_pool_grads_f32(
    y: &[f32],
    dp: &[f32],
    k: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> (CpuStorage, Shape) {
    let (hw, ohw) = (h * w, oh * ow);
    packed_grads_f32(y.len(), k, hw, |plane, d| {
        relu_pool_plane(
            &y[plane * hw..(plane + 1) * hw],
            &dp[plane * ohw..(plane + 1) * ohw],
            d,
            (h, w),
            (oh, ow),
        )
    })
}

/// One plane of [`relu_pool_grads_f32`]: every element of `d` is written. Each window's
/// gradient goes to its first maximum (a larger value replaces), and passes the ReLU where that
/// maximum is positive; a window with a NaN passes nothing (the pool's backward pass routes it
/// to the NaN, where the ReLU stops it). Elements outside every window get 0.
fn relu_pool_plane(y: &[f32], g: &[f32], d: &mut [MaybeUninit<f32>], (h, w): (usize, usize), (oh, ow): (usize, usize)) {
    let fast = crate::cpu_features::avx2();
    let rows = y[..2 * oh * w]
        .chunks_exact(2 * w)
        .zip(d[..2 * oh * w].chunks_exact_mut(2 * w));
    for ((yr, dr), gr) in rows.zip(g.chunks_exact(ow)) {
        let (top, bottom) = yr.split_at(w);
        let (dt, db) = dr.split_at_mut(w);
        // a column left over by an odd width (or a pooled map narrower than w / 2)
        dt[2 * ow..].fill(MaybeUninit::new(0.0));
        db[2 * ow..].fill(MaybeUninit::new(0.0));
        #[cfg(target_arch = "x86_64")]
        if fast {
            // SAFETY: `cpu_features::avx2()` found AVX2 on this CPU
            unsafe { super::avx2::relu_pool_rows(top, bottom, gr, dt, db) };
            continue;
        }
        let _ = fast; // (never set on other targets)
        relu_pool_rows(top, bottom, gr, dt, db);
    }
    // rows left over by an odd height (or a pooled map lower than h / 2)
    d[2 * oh * w..h * w].fill(MaybeUninit::new(0.0));
}

/// One row of windows of [`relu_pool_plane`]: the first `2·g.len()` values of `top` and
/// `bottom` (the window rows), their gradients into `dt` and `db`. Branch-free selects only, so
/// that the compiler vectorises it.
#[inline(always)]
pub(super) fn relu_pool_rows(
    top: &[f32],
    bottom: &[f32],
    g: &[f32],
    dt: &mut [MaybeUninit<f32>],
    db: &mut [MaybeUninit<f32>],
) {
    let n = g.len();
    let (top, bottom) = (&top[..2 * n], &bottom[..2 * n]);
    let (dt, db) = (&mut dt[..2 * n], &mut db[..2 * n]);
    for j in 0..n {
        let (a, b, c, e) = (top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]);
        let to_b = b > a;
        let m = if to_b { b } else { a };
        let to_c = c > m;
        let m = if to_c { c } else { m };
        let to_e = e > m;
        let m = if to_e { e } else { m };
        #[allow(
            clippy::eq_op,
            reason = "x != x is the NaN test, as a select the compiler vectorises"
        )]
        let nan = (a != a) | (b != b) | (c != c) | (e != e);
        // `0 + g`, as the two-pass version's `dx[best] += g` on a zeroed dx gives (so a -0
        // gradient arrives as +0 there too)
        let pass = if (m > 0.0) & !nan { 0.0 + g[j] } else { 0.0 };
        // the first maximum: the last of the replacing comparisons that held
        let (pe, rest) = if to_e { (pass, 0.0) } else { (0.0, pass) };
        let (pc, rest) = if to_c { (rest, 0.0) } else { (0.0, rest) };
        let (pb, pa) = if to_b { (rest, 0.0) } else { (0.0, rest) };
        dt[2 * j].write(pa);
        dt[2 * j + 1].write(pb);
        db[2 * j].write(pc);
        db[2 * j + 1].write(pe);
    }
}

/// The packed [dz (`len` values, planes of `hw`), db (`k` values)] of a backward op on the CPU:
/// `fill(plane, dz_plane)` writes every element of each plane, planes in parallel; each plane's
/// sum ([`plane_sum`]) on the way; db[c] adds channel c's plane sums in batch order (so the
/// result does not depend on the thread count).
fn packed_grads_f32(
    len: usize,
    k: usize,
    hw: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> (CpuStorage, Shape) {
    use rayon::prelude::*;
    let mut packed = Vec::<f32>::with_capacity(len + k);
    let (dz, db) = packed.spare_capacity_mut()[..len + k].split_at_mut(len);
    let sums: Vec<f32> = dz
        .par_chunks_mut(hw.max(1))
        .enumerate()
        .map(|(plane, d)| {
            fill(plane, d);
            // SAFETY: `fill` wrote every element of the plane; `MaybeUninit<f32>` has f32's layout
            let d = unsafe { &*(d as *const [MaybeUninit<f32>] as *const [f32]) };
            plane_sum(d)
        })
        .collect();
    let mut channel = vec![0f32; k];
    for (plane, s) in sums.into_iter().enumerate() {
        channel[plane % k] += s;
    }
    for (d, s) in db.iter_mut().zip(channel) {
        d.write(s);
    }
    // SAFETY: dz's planes were written by `fill`, db above
    unsafe { packed.set_len(len + k) };
    let len = packed.len();
    (CpuStorage::F32(packed), Shape::from(len))
}

/// The sum of a plane in a fixed order that vectorises: eight running sums (element i into
/// sum i mod 8), added pairwise, then the elements after the last multiple of 8 in order. The
/// same bits on any CPU and any thread count.
fn plane_sum(d: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = d.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    let [a, b, c, e, f, g, h, i] = lanes;
    let s = ((a + f) + (b + g)) + ((c + h) + (e + i));
    rest.iter().fold(s, |s, &v| s + v)
}

/// The packed [dz, db] of the backward ops on the CPU from the ReLU output `y` and the
/// gradient `dy` reaching it (both in the op's layout): dz = dy·\[y > 0\] in the storage dtype,
/// db its channel sums in f32 (as the CUDA kernels do).
fn cpu_relu_grads(y: &Tensor, dy: &Tensor, nhwc: bool) -> Result<(CpuStorage, Shape)> {
    let dz = (dy * y.gt(0.0)?.to_dtype(y.dtype())?)?;
    let dims = if nhwc { (0, 1, 2) } else { (0, 2, 3) };
    let db = dz.to_dtype(DType::F32)?.sum(dims)?.to_dtype(y.dtype())?;
    cpu_storage(&Tensor::cat(&[dz.flatten_all()?, db], 0)?)
}

/// Forward: (z, b) → y.
struct BiasRelu {
    nhwc: bool,
}

/// Backward: (y, dy) → [dz (N·K·H·W values), db (K values)], flat.
struct BiasReluBwd {
    nhwc: bool,
}

/// The bias reshaped to broadcast over an activation of either layout.
fn broadcast_bias(b: &Tensor, nhwc: bool) -> Result<Tensor> {
    if nhwc {
        b.reshape((1, 1, 1, ()))
    } else {
        b.reshape((1, (), 1, 1))
    }
}

impl CustomOp2 for BiasRelu {
    fn name(&self) -> &'static str {
        "gz-bias-relu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let z = cpu_tensor(s1, l1)?;
        let b = cpu_tensor(s2, l2)?;
        let y = z.broadcast_add(&broadcast_bias(&b, self.nhwc)?)?.relu()?;
        cpu_storage(&y)
    }

    #[allow(unused_variables, reason = "the arguments are only used with the cudnn feature")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cudnn")]
        {
            cuda::forward(s1, l1, s2, l2, self.nhwc)
        }
        #[cfg(not(feature = "cudnn"))]
        Err(super::no_backend(self.name()))
    }

    fn bwd(&self, _z: &Tensor, b: &Tensor, y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dz, db) = relu_grads(self.nhwc, b, y, dy)?;
        Ok((Some(dz), Some(db)))
    }
}

impl CustomOp2 for BiasReluBwd {
    fn name(&self) -> &'static str {
        "gz-bias-relu-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if let (false, Some((y, (_, k, h, w))), Some(dy)) =
            (self.nhwc, super::f32_planes(s1, l1), crate::cpu_conv::f32_view(s2, l2))
        {
            if dy.len() == y.len() && !y.is_empty() {
                return Ok(relu_grads_f32(y, dy, k, h * w));
            }
        }
        cpu_relu_grads(&cpu_tensor(s1, l1)?, &cpu_tensor(s2, l2)?, self.nhwc)
    }

    #[allow(unused_variables, reason = "the arguments are only used with the cudnn feature")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cudnn")]
        {
            cuda::backward(s1, l1, s2, l2, self.nhwc)
        }
        #[cfg(not(feature = "cudnn"))]
        Err(super::no_backend(self.name()))
    }
}

#[cfg(test)]
mod emu_tests;

/// Launch geometry of the kernels in `src/kernels/bias_relu.cu`: pure functions of the sizes,
/// shared by the CUDA launchers below and the emulator tests (`fused/emu_tests.rs`, which run
/// the kernels on the CPU with exactly these grids).
#[cfg_attr(
    not(any(feature = "cudnn", test)),
    allow(dead_code, reason = "used by the CUDA launchers and the emulator tests")
)]
pub(crate) mod grid {
    /// Threads per block of every bias_relu.cu kernel (the size of their shared arrays).
    pub(crate) const THREADS: u32 = 256;

    pub(crate) type Dim = (u32, u32, u32);

    /// A 1-D grid-stride launch over `total` values with ~4 per thread (bias_relu_fwd_flat,
    /// bias_relu_fwd_nhwc).
    pub(crate) fn stride4(total: u32) -> Dim {
        (total.div_ceil(THREADS * 4).clamp(1, 1 << 20), 1, 1)
    }

    /// Whether the NCHW forward takes the flat kernel: planes too small to keep a block per
    /// plane busy (Dieleman's 6×6 and 4×4 maps), and a size its 32-bit indices cover.
    pub(crate) fn fwd_is_flat(hw: u32, total: usize) -> bool {
        hw < THREADS * 4 && total <= i32::MAX as usize
    }

    /// bias_relu_fwd: x over planes, y over chunks of a plane (~4 values per thread, at most 64).
    pub(crate) fn fwd_planes(planes: u32, hw: u32) -> Dim {
        (planes, hw.div_ceil(THREADS * 4).clamp(1, 64), 1)
    }

    /// `bias_relu_pool_fwd[_nhwc]`: one thread per (window, channel), grid-stride.
    pub(crate) fn pool_fwd(threads: u32) -> Dim {
        (threads.div_ceil(THREADS).clamp(1, 1 << 20), 1, 1)
    }

    /// Splits of the batch per channel so that the grid has at least ~1,024 blocks.
    pub(crate) fn splits(n: u32, k: u32) -> u32 {
        1024u32.div_ceil(k).clamp(1, n.max(1))
    }

    /// bias_relu_bwd: (channels, batch splits) blocks; the number of partials per channel.
    pub(crate) fn bwd(n: u32, k: u32) -> (Dim, u32) {
        let s = splits(n, k);
        ((k, s, 1), s)
    }

    /// bias_relu_bwd_nhwc: ~2,048 blocks of contiguous row ranges (fewer with fewer rows).
    pub(crate) fn bwd_nhwc(rows: u32) -> (Dim, u32) {
        let s = rows.clamp(1, 2048);
        ((s, 1, 1), s)
    }

    /// relu_pool_bwd (NCHW: as [`bwd`]) and relu_pool_bwd_nhwc (~2,048 ranges of window rows:
    /// about two waves of 256-thread blocks on an H200).
    pub(crate) fn pool_bwd(n: u32, k: u32, h: u32, w: u32, nhwc: bool) -> (Dim, u32) {
        if nhwc {
            let s = (n * h.div_ceil(2) * w.div_ceil(2)).clamp(1, 2048);
            ((s, 1, 1), s)
        } else {
            bwd(n, k)
        }
    }

    /// bias_grad_finish: one thread per channel.
    pub(crate) fn finish(k: u32) -> Dim {
        (k.div_ceil(THREADS), 1, 1)
    }

    /// Whether the bias-gradient finish takes `bias_grad_finish_wide` (a block per channel) for
    /// `splits` partials a channel: with [`super::set_wide_bias_finish`] on and at least 64.
    #[cfg_attr(not(feature = "cudnn"), allow(dead_code, reason = "used by the CUDA launcher"))]
    pub(crate) fn finish_is_wide(splits: u32) -> bool {
        super::wide_bias_finish() && splits >= 64
    }

    /// bias_grad_finish_wide: one block per channel.
    pub(crate) fn finish_wide(k: u32) -> Dim {
        (k.max(1), 1, 1)
    }

    /// Values of `size` bytes per 16-byte vector of the vectorised channels-last kernels
    /// (`*_nhwc_v_*`: 8 bf16 or f16, 4 f32).
    pub(crate) fn vec_lanes(size: usize) -> usize {
        16 / size
    }

    /// Whether `k` channels of `size`-byte values suit the vectorised channels-last kernels: a
    /// whole number of 16-byte vectors, at most one block's threads of them (their lane walk),
    /// with [`super::set_nhwc_vectorised`] on. The buffers' alignment is the launcher's check.
    pub(crate) fn vec_fits(k: usize, size: usize) -> bool {
        let n = vec_lanes(size);
        super::nhwc_vectorised() && k > 0 && k % n == 0 && k / n <= THREADS as usize
    }
}

/// The bias gradient's finish by a block per channel (off until a device run has measured it;
/// [`set_wide_bias_finish`]).
static WIDE_FINISH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Lets the bias gradient's last step add each channel's partial sums with a block of threads
/// (`bias_grad_finish_wide`) where there are at least 64 of them (the channels-last backward
/// kernels write 2,048 a channel), instead of one thread per channel walking them all. Off by
/// default until a device run has measured it (`GZ_BIAS_FINISH=wide` in `gz`). Deterministic
/// either way; the f32 sums are added in another order.
pub fn set_wide_bias_finish(on: bool) {
    WIDE_FINISH.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_wide_bias_finish`] is on.
pub(crate) fn wide_bias_finish() -> bool {
    WIDE_FINISH.load(std::sync::atomic::Ordering::Relaxed)
}

/// Pooled channels-last layers keep a mask instead of their ReLU output (off until a device
/// run has measured it; [`set_pool_mask`]).
static POOL_MASK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Lets the pooled layers of the channels-last towers keep one byte per (pooled window,
/// channel) for their backward pass instead of their ReLU output ([`PoolSaved::Mask`]): the
/// forward pass no longer writes y and the backward pass no longer reads it (about a fifth of
/// the epilogues' bytes in VGG16-blog, and y's memory). Off by default until a device run has
/// measured it (`GZ_POOL_MASK=1` in `gz`). The same dz and db to the bit; on CUDA, layers the
/// vectorised kernels do not take keep y. On the CPU (channels-last there is for tests) every
/// pooled channels-last layer keeps a mask, through plain loops ([`cpu_pool_mask`]), so the CPU
/// tests run the towers' mask plumbing.
pub fn set_pool_mask(on: bool) {
    POOL_MASK.store(on, std::sync::atomic::Ordering::Relaxed);
}

thread_local! {
    static POOL_MASK_HERE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Whether [`set_pool_mask`] is on ([`with_pool_mask`] on this thread first).
pub(crate) fn pool_mask() -> bool {
    super::switch(&POOL_MASK_HERE, &POOL_MASK)
}

/// Runs `f` with [`set_pool_mask`] overridden on this thread only (tests compare both).
#[cfg(test)]
pub(crate) fn with_pool_mask<R>(on: bool, f: impl FnOnce() -> R) -> R {
    super::with_override(&POOL_MASK_HERE, on, f)
}

/// The vectorised channels-last epilogues (on by default; [`set_nhwc_vectorised`]).
static NHWC_VEC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Lets the channels-last epilogue kernels (bias + ReLU, with or without the 2×2 max-pool,
/// forward and backward) take 16 bytes of channels per thread where the channel count and
/// the buffers allow (the default), or keeps them to one value per thread (`false`;
/// `GZ_NHWC_VEC=0` in `gz`, for comparisons). The same values either way; the bias gradient's
/// f32 partial sums are added in another order.
pub fn set_nhwc_vectorised(on: bool) {
    NHWC_VEC.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_nhwc_vectorised`] allows the vectorised kernels.
pub(crate) fn nhwc_vectorised() -> bool {
    NHWC_VEC.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(feature = "cudnn")]
mod cuda {
    //! Launches of the kernels in `src/kernels/bias_relu.cu`.

    use candle_core::backend::BackendStorage;
    use candle_core::cuda::CudaDType;
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, WithDType};
    use cudarc::driver::{CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

    use super::grid::{self, THREADS};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bias_relu.ptx"));
    const MODULE: &str = "gz_bias_relu";

    fn err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Cuda(format!("bias_relu {what}: {e:?}").into())
    }

    fn suffix(dtype: DType) -> Result<&'static str> {
        Ok(match dtype {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            other => candle_core::bail!("bias_relu supports f32, bf16 and f16, not {other:?}"),
        })
    }

    fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("bias_relu: input is not contiguous");
        };
        let slice = s.as_cuda_slice::<T>()?;
        if b > slice.len() {
            candle_core::bail!("bias_relu: view {a}..{b} exceeds storage of {}", slice.len());
        }
        Ok(slice.slice(a..b))
    }

    /// (N·K, H·W, K) of an activation layout, checked to fit the kernels' 32-bit indices.
    fn geometry(l: &Layout) -> Result<(u32, u32, u32, u32)> {
        let (n, k, h, w) = l.shape().dims4()?;
        let fit = |v: usize, what: &str| {
            u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("bias_relu: {what} {v} too large")))
        };
        if n * k > i32::MAX as usize {
            candle_core::bail!("bias_relu: {n}×{k} planes exceed the grid");
        }
        Ok((
            fit(n, "batch")?,
            fit(k, "channels")?,
            fit(h * w, "plane size")?,
            fit(n * k, "planes")?,
        ))
    }

    pub(super) fn forward(
        z: &CudaStorage,
        lz: &Layout,
        b: &CudaStorage,
        lb: &Layout,
        nhwc: bool,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = z.device().clone();
        if lz.shape().elem_count() == 0 {
            candle_core::bail!("bias_relu: empty activation {:?}", lz.shape());
        }
        let y = super::super::backend::time_bias(&dev, || match z.dtype() {
            DType::F32 if nhwc => fwd_nhwc::<f32>(&dev, z, lz, b, lb),
            DType::BF16 if nhwc => fwd_nhwc::<half::bf16>(&dev, z, lz, b, lb),
            DType::F16 if nhwc => fwd_nhwc::<half::f16>(&dev, z, lz, b, lb),
            DType::F32 => fwd::<f32>(&dev, z, lz, b, lb),
            DType::BF16 => fwd::<half::bf16>(&dev, z, lz, b, lb),
            DType::F16 => fwd::<half::f16>(&dev, z, lz, b, lb),
            other => candle_core::bail!("bias_relu supports f32, bf16 and f16, not {other:?}"),
        })?;
        Ok((y, lz.shape().clone()))
    }

    fn fwd<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        z: &CudaStorage,
        lz: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<CudaStorage> {
        let (_, k, hw, planes) = geometry(lz)?;
        let zs = view::<T>(z, lz)?;
        let bs = view::<T>(b, lb)?;
        let total = planes as usize * hw as usize;
        // SAFETY: the kernel writes every element of `y` (each plane's whole range).
        let y = unsafe { dev.alloc::<T>(total) }?;
        if grid::fwd_is_flat(hw, total) {
            // small planes (Dieleman's late layers: 6×6, 4×4): one flat grid-stride pass (32-bit
            // indices), not a mostly idle 256-thread block per plane
            let total32 = u32_of(total, "size")?;
            let func =
                dev.get_or_load_custom_func(&format!("bias_relu_fwd_flat_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
            let cfg = LaunchConfig {
                grid_dim: grid::stride4(total32),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = func.builder();
            launch.arg(&zs).arg(&bs).arg(&y).arg(&total32).arg(&k).arg(&hw);
            // SAFETY: argument types and count match `bias_relu_fwd_flat_*` in bias_relu.cu;
            // z and y hold `total` elements, b k (the kernel reads b[(i / hw) % k]).
            unsafe { launch.launch(cfg) }.map_err(|e| err("forward launch", e))?;
            return Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()));
        }
        let func = dev.get_or_load_custom_func(&format!("bias_relu_fwd_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: grid::fwd_planes(planes, hw),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = func.builder();
        launch.arg(&zs).arg(&bs).arg(&y).arg(&k).arg(&hw);
        // SAFETY: argument types and count match `bias_relu_fwd_*` in bias_relu.cu; the buffers
        // hold planes·hw (z, y) and k (b) elements, the ranges the kernel touches.
        unsafe { launch.launch(cfg) }.map_err(|e| err("forward launch", e))?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }

    pub(super) fn backward(
        y: &CudaStorage,
        ly: &Layout,
        dy: &CudaStorage,
        ldy: &Layout,
        nhwc: bool,
    ) -> Result<(CudaStorage, Shape)> {
        if ly.shape() != ldy.shape() {
            candle_core::bail!("bias_relu backward: y {:?} and dy {:?} differ", ly.shape(), ldy.shape());
        }
        let dev = y.device().clone();
        if ly.shape().elem_count() == 0 {
            candle_core::bail!("bias_relu backward: empty activation {:?}", ly.shape());
        }
        if nhwc {
            let (n, h, w, k) = ly.shape().dims4()?;
            let total = n * h * w * k;
            let out = super::super::backend::time_bias(&dev, || match y.dtype() {
                DType::F32 => bwd_nhwc::<f32>(&dev, y, ly, dy, ldy, (n * h * w, k)),
                DType::BF16 => bwd_nhwc::<half::bf16>(&dev, y, ly, dy, ldy, (n * h * w, k)),
                DType::F16 => bwd_nhwc::<half::f16>(&dev, y, ly, dy, ldy, (n * h * w, k)),
                other => candle_core::bail!("bias_relu supports f32, bf16 and f16, not {other:?}"),
            })?;
            return Ok((out, Shape::from(total + k)));
        }
        let (n, k, hw, planes) = geometry(ly)?;
        let total = planes as usize * hw as usize;
        // the kernel walks (image, position) pairs of a channel with 32-bit indices
        if n as usize * hw as usize > i32::MAX as usize {
            candle_core::bail!("bias_relu backward: {n} images of {hw} values exceed the kernel's 32-bit indexing");
        }
        let out = super::super::backend::time_bias(&dev, || match y.dtype() {
            DType::F32 => bwd::<f32>(&dev, y, ly, dy, ldy, (n, k, hw), total),
            DType::BF16 => bwd::<half::bf16>(&dev, y, ly, dy, ldy, (n, k, hw), total),
            DType::F16 => bwd::<half::f16>(&dev, y, ly, dy, ldy, (n, k, hw), total),
            other => candle_core::bail!("bias_relu supports f32, bf16 and f16, not {other:?}"),
        })?;
        Ok((out, Shape::from(total + k as usize)))
    }

    /// The forward epilogue of [`super::ConvBiasReluPool`]: (z, b) → (y, p) in one pass,
    /// y = max(z + b, 0) and p its 2×2 max-pool (floor), in the layout of `lz`.
    pub(super) fn forward_pool(
        z: &CudaStorage,
        lz: &Layout,
        b: &CudaStorage,
        lb: &Layout,
        nhwc: bool,
    ) -> Result<(CudaStorage, CudaStorage)> {
        let (n, k, h, w) = super::super::nchw_dims(lz.shape(), nhwc)?;
        let dims = pool_fwd_dims((n, k, h, w))?;
        let dev = z.device().clone();
        super::super::backend::time_bias(&dev, || match z.dtype() {
            DType::F32 => fwd_pool::<f32>(&dev, z, lz, b, lb, dims, nhwc),
            DType::BF16 => fwd_pool::<half::bf16>(&dev, z, lz, b, lb, dims, nhwc),
            DType::F16 => fwd_pool::<half::f16>(&dev, z, lz, b, lb, dims, nhwc),
            other => candle_core::bail!("bias-relu-pool supports f32, bf16 and f16, not {other:?}"),
        })
    }

    fn fwd_pool<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        z: &CudaStorage,
        lz: &Layout,
        b: &CudaStorage,
        lb: &Layout,
        (n, k, h, w): (u32, u32, u32, u32),
        nhwc: bool,
    ) -> Result<(CudaStorage, CudaStorage)> {
        let zs = view::<T>(z, lz)?;
        let bs = view::<T>(b, lb)?;
        let total = lz.shape().elem_count();
        let pooled = n as usize * k as usize * (h / 2) as usize * (w / 2) as usize;
        // SAFETY: the kernel writes every element of y (the windows tile each plane) and every
        // element of p (each window inside the map writes its own).
        let y = unsafe { dev.alloc::<T>(total) }?;
        let p = unsafe { dev.alloc::<T>(pooled) }?;
        if let (true, Some(cvec)) = (nhwc, vec_cols(dev, k as usize, &[&zs, &bs])) {
            // y and p are fresh allocations (aligned)
            let threads = n * cvec * h.div_ceil(2) * w.div_ceil(2);
            let func =
                dev.get_or_load_custom_func(&format!("bias_relu_pool_fwd_nhwc_v_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
            let cfg = LaunchConfig {
                grid_dim: grid::pool_fwd(threads),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = func.builder();
            launch
                .arg(&zs)
                .arg(&bs)
                .arg(&y)
                .arg(&p)
                .arg(&n)
                .arg(&cvec)
                .arg(&h)
                .arg(&w);
            // SAFETY: argument types and count match `bias_relu_pool_fwd_nhwc_v_*`; z and y hold
            // n·h·w·cvec aligned vectors, b cvec, p n·(h/2)·(w/2)·cvec.
            unsafe { launch.launch(cfg) }.map_err(|e| err("bias-relu-pool launch", e))?;
            return Ok((
                CudaStorage::wrap_cuda_slice(y, dev.clone()),
                CudaStorage::wrap_cuda_slice(p, dev.clone()),
            ));
        }
        let threads = n * k * h.div_ceil(2) * w.div_ceil(2);
        let name = if nhwc {
            format!("bias_relu_pool_fwd_nhwc_{}", suffix(T::DTYPE)?)
        } else {
            format!("bias_relu_pool_fwd_{}", suffix(T::DTYPE)?)
        };
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: grid::pool_fwd(threads),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = func.builder();
        launch.arg(&zs).arg(&bs).arg(&y).arg(&p).arg(&n).arg(&k).arg(&h).arg(&w);
        // SAFETY: argument types and count match `bias_relu_pool_fwd[_nhwc]_*` in bias_relu.cu;
        // z and y hold n·k·h·w elements, b k, p n·k·(h/2)·(w/2).
        unsafe { launch.launch(cfg) }.map_err(|e| err("bias-relu-pool launch", e))?;
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            CudaStorage::wrap_cuda_slice(p, dev.clone()),
        ))
    }

    /// [`forward_pool`] keeping the pooling mask instead of y (channels-last, [`super::PoolSaved::Mask`]):
    /// (z (N, H, W, K), b) → (p, mask), or `None` where the vectorised kernels do not take the
    /// layer (the caller then keeps y).
    pub(super) fn forward_pool_mask(
        z: &CudaStorage,
        lz: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<Option<(CudaStorage, CudaStorage)>> {
        let (n, h, w, k) = lz.shape().dims4()?;
        let dims = pool_fwd_dims((n, k, h, w))?;
        let dev = z.device().clone();
        super::super::backend::time_bias(&dev, || match z.dtype() {
            DType::F32 => fwd_pool_mask::<f32>(&dev, z, lz, b, lb, dims),
            DType::BF16 => fwd_pool_mask::<half::bf16>(&dev, z, lz, b, lb, dims),
            DType::F16 => fwd_pool_mask::<half::f16>(&dev, z, lz, b, lb, dims),
            other => candle_core::bail!("bias-relu-pool supports f32, bf16 and f16, not {other:?}"),
        })
    }

    fn fwd_pool_mask<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        z: &CudaStorage,
        lz: &Layout,
        b: &CudaStorage,
        lb: &Layout,
        (n, k, h, w): (u32, u32, u32, u32),
    ) -> Result<Option<(CudaStorage, CudaStorage)>> {
        let zs = view::<T>(z, lz)?;
        let bs = view::<T>(b, lb)?;
        let Some(cvec) = vec_cols(dev, k as usize, &[&zs, &bs]) else {
            return Ok(None);
        };
        let pooled = n as usize * k as usize * (h / 2) as usize * (w / 2) as usize;
        // SAFETY: the kernel writes every element of p and every mask byte (one thread per
        // pooled window and vector column); both are fresh allocations (aligned).
        let p = unsafe { dev.alloc::<T>(pooled) }?;
        let mask = unsafe { dev.alloc::<u8>(pooled) }?;
        let threads = n * cvec * (h / 2) * (w / 2);
        let func = dev.get_or_load_custom_func(
            &format!("bias_relu_pool_fwd_mask_nhwc_v_{}", suffix(T::DTYPE)?),
            MODULE,
            PTX,
        )?;
        let cfg = LaunchConfig {
            grid_dim: grid::pool_fwd(threads),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = func.builder();
        launch
            .arg(&zs)
            .arg(&bs)
            .arg(&p)
            .arg(&mask)
            .arg(&n)
            .arg(&cvec)
            .arg(&h)
            .arg(&w);
        // SAFETY: argument types and count match `bias_relu_pool_fwd_mask_nhwc_v_*`; z holds
        // n·h·w·cvec aligned vectors, b cvec, p n·(h/2)·(w/2)·cvec and the mask as many times
        // the vector's lanes in bytes.
        unsafe { launch.launch(cfg) }.map_err(|e| err("bias-relu-pool-mask launch", e))?;
        Ok(Some((
            CudaStorage::wrap_cuda_slice(p, dev.clone()),
            CudaStorage::wrap_cuda_slice(mask, dev.clone()),
        )))
    }

    /// [`super::ReluPoolMaskBwd`] on CUDA: (mask, dp), both (N, H/2, W/2, K), → packed [dz,
    /// db] for the (H, W) map `hw`: one pass plus the bias-gradient finish.
    pub(super) fn pool_backward_mask(
        mask: &CudaStorage,
        lmask: &Layout,
        dp: &CudaStorage,
        ldp: &Layout,
        (h, w): (usize, usize),
    ) -> Result<(CudaStorage, Shape)> {
        let (n, oh, ow, k) = ldp.shape().dims4()?;
        if lmask.shape() != ldp.shape() || (oh, ow) != (h / 2, w / 2) || mask.dtype() != DType::U8 {
            candle_core::bail!(
                "relu-pool backward: mask {:?} ({:?}), dp {:?} and a {h}×{w} map do not match",
                lmask.shape(),
                mask.dtype(),
                ldp.shape()
            );
        }
        let (dims, total) = pool_bwd_dims((n, k, h, w))?;
        let dev = dp.device().clone();
        let out = super::super::backend::time_bias(&dev, || match dp.dtype() {
            DType::F32 => pool_bwd_mask::<f32>(&dev, mask, lmask, dp, ldp, dims, total),
            DType::BF16 => pool_bwd_mask::<half::bf16>(&dev, mask, lmask, dp, ldp, dims, total),
            DType::F16 => pool_bwd_mask::<half::f16>(&dev, mask, lmask, dp, ldp, dims, total),
            other => candle_core::bail!("relu-pool backward supports f32, bf16 and f16, not {other:?}"),
        })?;
        Ok((out, Shape::from(total + k)))
    }

    fn pool_bwd_mask<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        mask: &CudaStorage,
        lmask: &Layout,
        dp: &CudaStorage,
        ldp: &Layout,
        (n, k, h, w): (u32, u32, u32, u32),
        total: usize,
    ) -> Result<CudaStorage> {
        let ms = view::<u8>(mask, lmask)?;
        let dps = view::<T>(dp, ldp)?;
        // (not `vec_cols`: `set_nhwc_vectorised` chooses between kernels, and this one has no
        // alternative)
        let lanes = grid::vec_lanes(std::mem::size_of::<T>()) as u32;
        let stream = dev.cuda_stream();
        let aligned = {
            let (mp, _sync) = ms.device_ptr(&stream);
            let (dpp, _sync) = dps.device_ptr(&stream);
            mp % 16 == 0 && dpp % 16 == 0
        };
        if k % lanes != 0 || k / lanes > THREADS || !aligned {
            // the forward pass makes a mask only where these kernels take the layer, and
            // relu_pool_grads_from hands them an aligned dp
            candle_core::bail!(
                "relu-pool backward: the pooling mask's kernel needs {k} channels in 16-byte vectors and aligned buffers"
            );
        }
        let cvec = k / lanes;
        let (dims, s) = grid::pool_bwd(n, k, h, w, true);
        // the walk of relu_pool_bwd_nhwc_v with the mask's bytes in place of y (dz starts the
        // fresh packed buffer)
        packed_backward::<T>(
            dev,
            "relu_pool_bwd_mask_nhwc_v",
            (&ms, &dps),
            total,
            k,
            (dims, s),
            &[n, cvec, h, w],
        )
    }

    /// [`super::ReluPoolBwd`] on CUDA: (y, dp) → packed [dz, db], one pass over y plus the
    /// bias-gradient finish.
    pub(super) fn pool_backward(
        y: &CudaStorage,
        ly: &Layout,
        dp: &CudaStorage,
        ldp: &Layout,
        nhwc: bool,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, k, h, w) = super::super::nchw_dims(ly.shape(), nhwc)?;
        let (pn, pk, ph, pw) = super::super::nchw_dims(ldp.shape(), nhwc)?;
        if (pn, pk, ph, pw) != (n, k, h / 2, w / 2) {
            candle_core::bail!(
                "relu-pool backward: y {:?} and dp {:?} do not match",
                ly.shape(),
                ldp.shape()
            );
        }
        let (dims, total) = pool_bwd_dims((n, k, h, w))?;
        let dev = y.device().clone();
        let out = super::super::backend::time_bias(&dev, || match y.dtype() {
            DType::F32 => pool_bwd::<f32>(&dev, y, ly, dp, ldp, dims, total, nhwc),
            DType::BF16 => pool_bwd::<half::bf16>(&dev, y, ly, dp, ldp, dims, total, nhwc),
            DType::F16 => pool_bwd::<half::f16>(&dev, y, ly, dp, ldp, dims, total, nhwc),
            other => candle_core::bail!("relu-pool backward supports f32, bf16 and f16, not {other:?}"),
        })?;
        Ok((out, Shape::from(total + k)))
    }

    #[allow(clippy::too_many_arguments)]
    fn pool_bwd<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        y: &CudaStorage,
        ly: &Layout,
        dp: &CudaStorage,
        ldp: &Layout,
        (n, k, h, w): (u32, u32, u32, u32),
        total: usize,
        nhwc: bool,
    ) -> Result<CudaStorage> {
        let ys = view::<T>(y, ly)?;
        let dps = view::<T>(dp, ldp)?;
        let (dims, s) = grid::pool_bwd(n, k, h, w, nhwc);
        if let (true, Some(cvec)) = (nhwc, vec_cols(dev, k as usize, &[&ys, &dps])) {
            // the same walk by aligned vectors of channels (dz starts the fresh packed buffer)
            return packed_backward::<T>(
                dev,
                "relu_pool_bwd_nhwc_v",
                (&ys, &dps),
                total,
                k,
                (dims, s),
                &[n, cvec, h, w],
            );
        }
        let name = if nhwc { "relu_pool_bwd_nhwc" } else { "relu_pool_bwd" };
        // each window writes its valid positions and the windows tile the plane, so every dz
        // element is written; y and dz hold n·k·h·w elements, dp n·k·(h/2)·(w/2)
        packed_backward::<T>(dev, name, (&ys, &dps), total, k, (dims, s), &[n, k, h, w])
    }

    /// Whether the vectorised channels-last kernels take `k` channels of T with these buffers
    /// ([`grid::vec_fits`], and every buffer 16-byte aligned); `Some(k / lanes)`, the vectors
    /// per row, when they do.
    fn vec_cols<T: CudaDType>(dev: &CudaDevice, k: usize, views: &[&CudaView<'_, T>]) -> Option<u32> {
        let size = std::mem::size_of::<T>();
        if !grid::vec_fits(k, size) {
            return None;
        }
        let stream = dev.cuda_stream();
        let aligned = views.iter().all(|v| {
            let (ptr, _sync) = v.device_ptr(&stream);
            ptr % 16 == 0
        });
        if aligned {
            u32::try_from(k / grid::vec_lanes(size)).ok()
        } else {
            None
        }
    }

    /// The pooled forward kernels' (n, k, h, w), checked: a 2×2 window fits, and their 32-bit
    /// indices cover the (window, channel) pairs.
    fn pool_fwd_dims((n, k, h, w): (usize, usize, usize, usize)) -> Result<(u32, u32, u32, u32)> {
        if h < 2 || w < 2 {
            candle_core::bail!("bias-relu-pool: {h}×{w} is smaller than the 2×2 window");
        }
        if n * k * h.div_ceil(2) * w.div_ceil(2) > i32::MAX as usize {
            candle_core::bail!("bias-relu-pool: {n}×{k} planes of {h}×{w} exceed the kernel's 32-bit indexing");
        }
        Ok((
            u32_of(n, "batch")?,
            u32_of(k, "channels")?,
            u32_of(h, "height")?,
            u32_of(w, "width")?,
        ))
    }

    /// The ReLU + pool backward kernels' (n, k, h, w), checked, and the activation's size: not
    /// empty, within 32 bits, and (image, window) pairs the kernels walk with 32-bit indices.
    fn pool_bwd_dims((n, k, h, w): (usize, usize, usize, usize)) -> Result<((u32, u32, u32, u32), usize)> {
        let total = n * k * h * w;
        if total == 0 {
            candle_core::bail!("relu-pool backward: empty activation (n {n}, k {k}, {h}×{w})");
        }
        u32_of(total, "size")?;
        if n * h.div_ceil(2) * w.div_ceil(2) > i32::MAX as usize {
            candle_core::bail!("relu-pool backward: {n} images of {h}×{w} exceed the kernel's 32-bit indexing");
        }
        Ok((
            (
                u32_of(n, "batch")?,
                u32_of(k, "channels")?,
                u32_of(h, "height")?,
                u32_of(w, "width")?,
            ),
            total,
        ))
    }

    fn u32_of(v: usize, what: &str) -> Result<u32> {
        u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("bias_relu: {what} {v} exceeds 32 bits")))
    }

    fn fwd_nhwc<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        z: &CudaStorage,
        lz: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<CudaStorage> {
        let (_, _, _, k) = lz.shape().dims4()?;
        let total = lz.shape().elem_count();
        // the grid-stride loop's 32-bit index steps by up to 2^28
        if total > i32::MAX as usize {
            candle_core::bail!("bias_relu: {total} values exceed the NHWC kernel's 32-bit indexing");
        }
        let (total32, k32) = (u32_of(total, "size")?, u32_of(k, "channels")?);
        let zs = view::<T>(z, lz)?;
        let bs = view::<T>(b, lb)?;
        // SAFETY: the kernel writes every element of `y` (grid-stride over `total`).
        let y = unsafe { dev.alloc::<T>(total) }?;
        if let Some(cvec) = vec_cols(dev, k, &[&zs, &bs]) {
            // `y` is a fresh allocation (aligned); `total` is a multiple of k, so of the lanes
            let vecs = u32_of(total / grid::vec_lanes(std::mem::size_of::<T>()), "size")?;
            let func =
                dev.get_or_load_custom_func(&format!("bias_relu_fwd_nhwc_v_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
            let cfg = LaunchConfig {
                grid_dim: grid::stride4(vecs),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = func.builder();
            launch.arg(&zs).arg(&bs).arg(&y).arg(&vecs).arg(&cvec);
            // SAFETY: argument types and count match `bias_relu_fwd_nhwc_v_*`; z and y hold
            // `vecs` 16-byte vectors and b `cvec`, all 16-byte aligned (checked above).
            unsafe { launch.launch(cfg) }.map_err(|e| err("NHWC forward launch", e))?;
            return Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()));
        }
        let func = dev.get_or_load_custom_func(&format!("bias_relu_fwd_nhwc_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: grid::stride4(total32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = func.builder();
        launch.arg(&zs).arg(&bs).arg(&y).arg(&total32).arg(&k32);
        // SAFETY: argument types and count match `bias_relu_fwd_nhwc_*`; z and y hold `total`
        // elements and b `k`.
        unsafe { launch.launch(cfg) }.map_err(|e| err("NHWC forward launch", e))?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }

    fn bwd_nhwc<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        y: &CudaStorage,
        ly: &Layout,
        dy: &CudaStorage,
        ldy: &Layout,
        (rows, k): (usize, usize),
    ) -> Result<CudaStorage> {
        let total = rows * k;
        let (rows32, k32) = (u32_of(rows, "rows")?, u32_of(k, "channels")?);
        u32_of(total, "size")?;
        let ys = view::<T>(y, ly)?;
        let dys = view::<T>(dy, ldy)?;
        if let Some(cvec) = vec_cols(dev, k, &[&ys, &dys]) {
            // y, dy and dz hold rows·cvec aligned vectors (dz starts the fresh packed buffer)
            return packed_backward::<T>(
                dev,
                "bias_relu_bwd_nhwc_v",
                (&ys, &dys),
                total,
                k32,
                grid::bwd_nhwc(rows32),
                &[rows32, cvec],
            );
        }
        // y, dy and dz hold rows·k elements
        packed_backward::<T>(
            dev,
            "bias_relu_bwd_nhwc",
            (&ys, &dys),
            total,
            k32,
            grid::bwd_nhwc(rows32),
            &[rows32, k32],
        )
    }

    fn bwd<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        y: &CudaStorage,
        ly: &Layout,
        dy: &CudaStorage,
        ldy: &Layout,
        (n, k, hw): (u32, u32, u32),
        total: usize,
    ) -> Result<CudaStorage> {
        let ys = view::<T>(y, ly)?;
        let dys = view::<T>(dy, ldy)?;
        // y, dy and dz hold n·k·hw elements
        packed_backward::<T>(
            dev,
            "bias_relu_bwd",
            (&ys, &dys),
            total,
            k,
            grid::bwd(n, k),
            &[n, k, hw],
        )
    }

    /// The backward kernels' common launch: `{name}_{dtype}(y, g, dz, partial, dims...)` with
    /// `grid` (whose `splits` is the number of partials per channel), then the bias-gradient
    /// finish. Returns the packed [dz (`total` values), db (`k` values)]. The first kernel must
    /// write every dz element and every partial (all of them in bias_relu.cu do); `y` and `g`
    /// must hold what the kernel reads for `dims`. `y` is the ReLU output (T), or the pooling
    /// mask (bytes) for `relu_pool_bwd_mask_nhwc_v`.
    fn packed_backward<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        name: &str,
        (y, g): (&CudaView<'_, impl DeviceRepr>, &CudaView<'_, T>),
        total: usize,
        k: u32,
        (grid, splits): ((u32, u32, u32), u32),
        dims: &[u32],
    ) -> Result<CudaStorage> {
        // SAFETY: the first kernel writes all `total` dz values and every partial, the finish
        // all k bias-gradient values (see above).
        let mut out = unsafe { dev.alloc::<T>(total + k as usize) }?;
        let partial = unsafe { dev.alloc::<f32>(k as usize * splits as usize) }?;
        let sfx = suffix(T::DTYPE)?;
        {
            let mut dz = out.slice_mut(..total);
            let func = dev.get_or_load_custom_func(&format!("{name}_{sfx}"), MODULE, PTX)?;
            let cfg = LaunchConfig {
                grid_dim: grid,
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = func.builder();
            launch.arg(y).arg(g).arg(&mut dz).arg(&partial);
            for d in dims {
                launch.arg(d);
            }
            // SAFETY: the backward kernels of bias_relu.cu all take (const T* y, const T* g,
            // T* dz, float* partial) then their uint32_t dims in this order; 256 threads, the
            // size of their shared arrays; `partial` holds k·splits values.
            unsafe { launch.launch(cfg) }.map_err(|e| err(&format!("{name} launch"), e))?;
        }
        finish_bias_grad(dev, &partial, &mut out, total, k, splits, sfx)?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    /// The second backward kernel: `out[total..total + k]` (the bias gradient) = the sum of each
    /// channel's `s` partials, in order.
    fn finish_bias_grad<T: DeviceRepr>(
        dev: &CudaDevice,
        partial: &cudarc::driver::CudaSlice<f32>,
        out: &mut cudarc::driver::CudaSlice<T>,
        total: usize,
        k: u32,
        s: u32,
        sfx: &str,
    ) -> Result<()> {
        let mut db = out.slice_mut(total..);
        let (name, grid_dim) = if grid::finish_is_wide(s) {
            ("bias_grad_finish_wide", grid::finish_wide(k))
        } else {
            ("bias_grad_finish", grid::finish(k))
        };
        let func = dev.get_or_load_custom_func(&format!("{name}_{sfx}"), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim,
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = func.builder();
        launch.arg(partial).arg(&mut db).arg(&k).arg(&s);
        // SAFETY: argument types and count match `bias_grad_finish[_wide]_*`; `partial` holds
        // k·s values and `db` the k after `total`.
        unsafe { launch.launch(cfg) }.map_err(|e| err("bias-gradient launch", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;

    /// The fused op against candle's `broadcast_add(..).relu()`: values and both gradients.
    fn check(device: &Device, dtype: DType, tol: f32) -> Result<()> {
        // deterministic pseudo-random values (candle's CPU randn is not seedable)
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut values = |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
                })
                .collect()
        };
        let shape = (3, 5, 7, 6);
        let z0 = Tensor::from_vec(values(3 * 5 * 7 * 6, 2.0), shape, device)?.to_dtype(dtype)?;
        let b0 = Tensor::from_vec(values(5, 1.0), 5, device)?.to_dtype(dtype)?;
        let g = Tensor::from_vec(values(3 * 5 * 7 * 6, 2.0), shape, device)?.to_dtype(dtype)?;
        // Where z + b is exactly 0 (common in bf16) the subgradient is a convention: candle's
        // ReLU passes the gradient there (x >= 0), the fused op does not (y > 0, as PyTorch).
        // Move such points off 0 so the comparison is about the formulas, not the convention.
        let at_zero = z0.broadcast_add(&b0.reshape((1, (), 1, 1))?)?.eq(0.0)?;
        let z0 = at_zero.where_cond(&(&z0 + 0.125)?, &z0)?;
        let run = |fused: bool| -> Result<(Tensor, Tensor, Tensor)> {
            let z = Var::from_tensor(&z0)?;
            let b = Var::from_tensor(&b0)?;
            let y = if fused {
                bias_relu(z.as_tensor(), b.as_tensor())?
            } else {
                z.as_tensor()
                    .broadcast_add(&b.as_tensor().reshape((1, (), 1, 1))?)?
                    .relu()?
            };
            let loss = (y.to_dtype(DType::F32)? * g.to_dtype(DType::F32)?)?.sum_all()?;
            let grads = loss.backward()?;
            let dz = grads.get(z.as_tensor()).expect("z has a gradient").clone();
            let db = grads.get(b.as_tensor()).expect("b has a gradient").clone();
            Ok((y, dz, db))
        };
        let (fy, fdz, fdb) = run(true)?;
        let (ry, rdz, _) = run(false)?;
        // candle sums a bf16/f16 gradient in its own dtype; the fused op (like cuDNN and
        // PyTorch) accumulates in f32: compare with the f32 sum of candle's dz
        let rdb = rdz.to_dtype(DType::F32)?.sum((0, 2, 3))?;
        for (name, a, b) in [("y", fy, ry), ("dz", fdz, rdz), ("db", fdb, rdb)] {
            let a = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let b = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(a.len(), b.len(), "{name}: lengths");
            let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(
                worst <= tol * scale,
                "{name} {dtype:?}: max diff {worst} (scale {scale})"
            );
        }
        Ok(())
    }

    #[test]
    fn fused_bias_relu_matches_candle_on_cpu() -> Result<()> {
        check(&Device::Cpu, DType::F32, 1e-6)?;
        check(&Device::Cpu, DType::BF16, 1e-2)?;
        check(&Device::Cpu, DType::F16, 2e-3)
    }

    #[test]
    fn no_gradient_where_the_sum_is_exactly_zero() -> Result<()> {
        let dev = Device::Cpu;
        let z = Var::from_tensor(&Tensor::new(&[[[[-0.5f32, 0.5]]], [[[1.0, -1.0]]]], &dev)?)?;
        let b = Var::from_tensor(&Tensor::new(&[0.5f32], &dev)?)?;
        let y = bias_relu(z.as_tensor(), b.as_tensor())?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [0.0, 1.0, 1.5, 0.0]);
        let grads = y.sum_all()?.backward()?;
        let dz = grads.get(z.as_tensor()).expect("dz").flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(dz, [0.0, 1.0, 1.0, 0.0]);
        let db = grads.get(b.as_tensor()).expect("db").to_vec1::<f32>()?;
        assert_eq!(db, [2.0]);
        Ok(())
    }

    /// The one-pass ReLU + pool backward against the pool's backward pass followed by the
    /// ReLU's, to the bit: odd and even sides, ties (whole windows at 0, repeated maxima),
    /// NaNs, -0 gradients and pooled maps smaller than h/2 × w/2.
    #[test]
    fn relu_pool_grads_match_the_two_passes_to_the_bit() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for (n, k, h, w, oh, ow) in [
            (2, 3, 6, 8, 3, 4),
            (1, 2, 7, 5, 3, 2),
            (3, 1, 2, 2, 1, 1),
            (1, 4, 9, 9, 3, 4),
            (2, 2, 5, 6, 2, 3),
        ] {
            let y: Vec<f32> = (0..n * k * h * w)
                .map(|_| match next() % 16 {
                    0..=4 => 0.0,
                    5..=8 => 1.5,
                    9 => f32::NAN,
                    r => r as f32 * 0.25 - 2.0 + (next() >> 40) as f32 / (1u64 << 24) as f32,
                })
                .collect();
            let dp: Vec<f32> = (0..n * k * oh * ow)
                .map(|_| match next() % 8 {
                    0 => -0.0,
                    _ => (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0,
                })
                .collect();
            let dy = super::super::pool_bwd_f32(&y, &dp, (h, w), (oh, ow));
            let (CpuStorage::F32(want), _) = relu_grads_f32(&y, &dy, k, h * w) else {
                unreachable!("f32 in, f32 out")
            };
            let (CpuStorage::F32(got), _) = relu_pool_grads_f32(&y, &dp, k, (h, w), (oh, ow)) else {
                unreachable!("f32 in, f32 out")
            };
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{:?} element {i}: {a} vs {b}",
                    (n, k, h, w, oh, ow)
                );
            }
        }
    }

    /// The pooled layers' mask path on the CPU ([`set_pool_mask`]): the mask of a channels-last
    /// ReLU output, then the backward op from it, give the y-keeping backward op's dz (equal
    /// values; a -0 gradient at a window whose maximum is 0 comes out +0) and db (to the bit),
    /// in f32 and bf16, with odd and even sides, whole windows at 0 and repeated maxima. (No
    /// NaN: y is a ReLU output.)
    #[test]
    fn pool_mask_grads_match_the_relu_output_ones() -> Result<()> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for dtype in [DType::F32, DType::BF16] {
            for (n, h, w, k) in [(2, 6, 8, 3), (1, 7, 5, 2), (3, 2, 2, 1), (1, 9, 9, 4), (2, 5, 6, 8)] {
                let y: Vec<f32> = (0..n * h * w * k)
                    .map(|_| match next() % 16 {
                        0..=4 => 0.0,
                        5..=8 => 1.5,
                        r => r as f32 * 0.25 + (next() >> 40) as f32 / (1u64 << 24) as f32,
                    })
                    .collect();
                let (oh, ow) = (h / 2, w / 2);
                let dp: Vec<f32> = (0..n * oh * ow * k)
                    .map(|_| match next() % 8 {
                        0 => -0.0,
                        _ => (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0,
                    })
                    .collect();
                let y = Tensor::from_vec(y, (n, h, w, k), &candle_core::Device::Cpu)?.to_dtype(dtype)?;
                let dp = Tensor::from_vec(dp, (n, oh, ow, k), &candle_core::Device::Cpu)?.to_dtype(dtype)?;
                let want = y.apply_op2_no_bwd(&dp, &ReluPoolBwd { nhwc: true })?;
                let mask = cpu_pool_mask(&y)?;
                assert_eq!(mask.dims(), [n, oh, ow, k]);
                let got = mask.apply_op2_no_bwd(&dp, &ReluPoolMaskBwd { hw: (h, w) })?;
                let (want, got) = (
                    want.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                    got.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                );
                assert_eq!(got.len(), want.len());
                let total = n * h * w * k;
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    let same = if i < total { a == b } else { a.to_bits() == b.to_bits() };
                    assert!(same, "{:?} {dtype:?} element {i} of {total}: {a} vs {b}", (n, h, w, k));
                }
                // and the relu-pool backward from either kept form agrees
                let b = Tensor::zeros(k, dtype, &candle_core::Device::Cpu)?;
                let kept = PoolSaved::Mask { mask, hw: (h, w) };
                let (dz, db) = relu_pool_grads_from(true, &b, &kept, &dp)?;
                let (dz_y, db_y) = relu_pool_grads_from(true, &b, &PoolSaved::Relu(y.clone()), &dp)?;
                assert_eq!(dz.dims(), dz_y.dims());
                assert_eq!(crate::testutil::max_abs_diff(&dz, &dz_y), 0.0);
                assert_eq!(crate::testutil::max_abs_diff(&db, &db_y), 0.0);
            }
        }
        Ok(())
    }

    /// The plane sum adds every element (a remainder after the last multiple of 8 too) and
    /// stays within f32 rounding of the exact sum.
    #[test]
    fn plane_sums_add_every_element() {
        for n in 0usize..70 {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3 + 1.0 / (i + 1) as f32)
                .collect();
            let exact: f64 = v.iter().map(|&x| f64::from(x)).sum();
            let got = f64::from(plane_sum(&v));
            assert!(
                (got - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                "n {n}: {got} vs {exact}"
            );
            // each element counts once: raising one raises the sum by as much
            for i in [0, n / 2, n.saturating_sub(1)].into_iter().filter(|&i| i < n) {
                let mut w = v.clone();
                w[i] += 1024.0;
                let d = f64::from(plane_sum(&w)) - got;
                assert!((d - 1024.0).abs() < 1e-2, "n {n}, element {i}: the sum moved by {d}");
            }
        }
    }

    #[test]
    fn bias_relu_rejects_mismatched_bias() -> Result<()> {
        let z = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu)?;
        let b = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
        let e = bias_relu(&z, &b).expect_err("4 biases for 3 channels");
        assert!(e.to_string().contains("does not match 3 channels"), "{e}");
        Ok(())
    }

    /// The CUDA kernels against candle's CUDA kernels (run on a GPU machine; skipped without one).
    #[cfg(feature = "cudnn")]
    #[test]
    fn cuda_fused_bias_relu_matches_candle() -> Result<()> {
        let Some(dev) = crate::testutil::gpu() else {
            return Ok(());
        };
        check(&dev, DType::F32, 1e-5)?;
        check(&dev, DType::BF16, 1e-2)?;
        check(&dev, DType::F16, 2e-3)?;
        // every layer shape of both nets (batch 8), f32
        for (k, h) in [
            (32, 106),
            (64, 53),
            (128, 26),
            (256, 13),
            (512, 6),
            (32, 40),
            (64, 16),
            (128, 6),
            (128, 4),
        ] {
            let z = Tensor::randn(0f32, 1.0, (8, k, h, h), &dev)?;
            let b = Tensor::randn(0f32, 1.0, k, &dev)?;
            let fused = bias_relu(&z, &b)?.flatten_all()?.to_vec1::<f32>()?;
            let reference = z
                .broadcast_add(&b.reshape((1, (), 1, 1))?)?
                .relu()?
                .flatten_all()?
                .to_vec1::<f32>()?;
            assert_eq!(fused, reference, "k {k}, side {h}");
        }
        Ok(())
    }
}
