//! Convolution and pooling layers used by every net in [`crate::nets`].
//!
//! The nets never call candle's `conv2d` directly: they build [`Conv2d`] here, so the fast
//! CUDA path (cuDNN behind candle custom ops, [`crate::cudnn`], `cudnn` feature) replaces the
//! kernels without touching model code. In CPU training the layer is the same custom op with
//! gz's f32 CPU convolution inside ([`crate::cpu_conv`], its CPU twin), so the CPU trains with
//! the model code the GPU runs, and the backward pass skips the image layer's backward-data,
//! whose result candle would drop (`docs/benchmarks.md`). CPU inference runs the same kernel
//! without a graph; CUDA without the feature, and the fast path switched off
//! ([`crate::cudnn::set_enabled`], `GZ_CONV=candle`) use candle's own convolution. [`linear()`]
//! does the same for the dense layers on the CPU.
//! Parameter names (`weight`, `bias`) match `candle_nn::Conv2d`, so checkpoints are the same
//! whichever path trained them, and a checkpoint trained on the fast path predicts the same on
//! CPU.
//!
//! [`max_pool2`] uses the custom max-pool op on CPU too, and never candle's `max_pool2d`: in
//! candle 0.11.1 its backward gives a window's unique maximum a quarter of the gradient and
//! misroutes gradients when a side is odd (see [`crate::cudnn`]).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

mod linear;

thread_local! {
    static NO_GRAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` knowing that no backward pass follows (validation, inference), as PyTorch's
/// `no_grad`: the convolution tower op ([`crate::cudnn::tower`]) then builds no graph node and
/// keeps nothing for one, even where the weights are variables (a model in training). Candle's
/// own ops still record theirs: detach what is kept past the batch. For this thread, restored
/// on the way out (a panic too).
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            NO_GRAD.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(NO_GRAD.with(|c| c.replace(true)));
    f()
}

/// False inside [`no_grad`].
pub fn grad_enabled() -> bool {
    !NO_GRAD.with(|c| c.get())
}

/// A 2-D convolution with bias, square kernel, stride 1 unless configured.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
    stride: usize,
}

impl Conv2d {
    /// Creates the layer with Kaiming-style initialisation; names `weight` (out,in,k,k) and `bias`.
    pub fn new(in_c: usize, out_c: usize, k: usize, padding: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let fan_in = (in_c * k * k) as f64;
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: (2.0 / fan_in).sqrt(),
        };
        let weight = vb.get_with_hints((out_c, in_c, k, k), "weight", init)?;
        let bias = vb.get_with_hints(out_c, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            padding,
            stride,
        })
    }

    /// `relu(self.forward(x))`; on the fast path the bias add and ReLU are one fused kernel
    /// ([`crate::cudnn::conv2d_relu`]), elsewhere candle's ops.
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        let fused = crate::cudnn::active_for(x.device()) && crate::cudnn::fused_enabled();
        if fused || crate::cudnn::cpu_fused_for(x, &self.weight) {
            return crate::cudnn::conv2d_relu(x, &self.weight, &self.bias, self.padding, self.stride);
        }
        self.forward(x)?.relu()
    }

    /// [`Conv2d::forward_relu`] on a channels-last (N, H, W, C) input, giving (N, H', W', K)
    /// (see [`crate::cudnn::set_nhwc`]); `nhwc == false` is [`Conv2d::forward_relu`].
    pub fn forward_relu_in(&self, x: &Tensor, nhwc: bool) -> Result<Tensor> {
        if !nhwc {
            return self.forward_relu(x);
        }
        // the checkpoint keeps (K, C, R, S); cuDNN's NHWC filters are (K, R, S, C)
        let w = self.weight.permute((0, 2, 3, 1))?.contiguous()?;
        crate::cudnn::conv2d_relu_nhwc(x, &w, &self.bias, self.padding, self.stride)
    }

    /// `max_pool2(relu(self.forward(x)))` in either layout (`nhwc` as in
    /// [`Conv2d::forward_relu_in`]); wherever the fused epilogue runs, one custom op
    /// ([`crate::cudnn::conv2d_relu_pool`]), elsewhere candle's ops and [`max_pool2`].
    pub fn forward_relu_pool_in(&self, x: &Tensor, nhwc: bool) -> Result<Tensor> {
        if nhwc {
            let w = self.weight.permute((0, 2, 3, 1))?.contiguous()?;
            return crate::cudnn::conv2d_relu_pool_nhwc(x, &w, &self.bias, self.padding, self.stride);
        }
        let fused = crate::cudnn::active_for(x.device()) && crate::cudnn::fused_enabled();
        if fused || crate::cudnn::cpu_fused_for(x, &self.weight) {
            return crate::cudnn::conv2d_relu_pool(x, &self.weight, &self.bias, self.padding, self.stride);
        }
        max_pool2(&self.forward(x)?.relu()?)
    }

    /// The weight tensor (out, in, k, k).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // in CPU training the custom op too: its CPU path is gz's f32 convolution
        // (`crate::cpu_conv`), and its backward pass skips the input gradient of an input
        // outside the graph (the images); `cudnn::set_enabled(false)` (`GZ_CONV=candle`) keeps
        // candle's own convolution and autograd
        let cpu_training = x.device().is_cpu() && crate::cudnn::enabled() && (x.track_op() || self.weight.track_op());
        if crate::cudnn::active_for(x.device()) || cpu_training {
            return crate::cudnn::conv2d(x, &self.weight, &self.bias, self.padding, self.stride);
        }
        // CPU inference (no graph to build): gz's own f32 kernel unless `GZ_CONV=candle`
        let no_graph = !(x.track_op() || self.weight.track_op() || self.bias.track_op());
        if no_graph && crate::cudnn::enabled() {
            if let Some(y) = crate::cpu_conv::conv2d(x, &self.weight, Some(&self.bias), self.padding, self.stride)? {
                return Ok(y);
            }
        }
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

/// A dense layer, `x·Wᵀ + b` for `x` (B, in): on the CPU in f32 one custom op
/// (`ops/linear.rs`): in training its backward returns the weight gradient in W's own layout
/// (candle's `Linear` transposes it twice and zero-fills two weight-sized tensors per step), and
/// at batches of up to 32 rows, training or not, its forward streams W once (candle's product
/// packs all of W first: for Dieleman's first dense layer, 134 MB per forward pass). Elsewhere,
/// and with `GZ_CPU_CONV=candle`, candle's `Linear`. The same values up to the order of the sums.
pub fn linear(d: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    let w = d.weight();
    if let Some(b) = d.bias() {
        let f32_cpu = [x, w, b].iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
        if f32_cpu && x.rank() == 2 && crate::cpu_conv::enabled() {
            let x = x.contiguous()?;
            return if x.track_op() || w.track_op() || b.track_op() {
                x.apply_op3(w, b, linear::LinearOp)
            } else {
                x.apply_op3_no_bwd(w, b, &linear::LinearOp)
            };
        }
    }
    d.forward(x)
}

/// Runs a convolution tower: each `(conv, pool)` is `relu(conv(x) + b)`, followed by a 2×2
/// max-pool when `pool`; `x` and the result are NCHW. Wherever the fused epilogue runs (CUDA
/// by default, `GZ_FUSED=0` off; or channels-last) the whole tower is one autograd node with its own
/// backward pass ([`crate::cudnn::tower`]) unless [`crate::cudnn::set_tower_op`]`(false)`;
/// elsewhere the layers go one by one through [`Tower`].
pub fn run_tower(x: &Tensor, layers: &[(&Conv2d, bool)]) -> Result<Tensor> {
    let dev = x.device();
    let nhwc = channels_last(dev);
    let fused_here = nhwc || (crate::cudnn::active_for(dev) && crate::cudnn::fused_enabled());
    if fused_here && crate::cudnn::tower_op_enabled() {
        return run_tower_as_one_op(x, layers, nhwc);
    }
    run_tower_by_layers(x, layers)
}

/// [`run_tower`] as one graph node, in the layout plan `nhwc` asks for.
pub(crate) fn run_tower_as_one_op(x: &Tensor, layers: &[(&Conv2d, bool)], nhwc: bool) -> Result<Tensor> {
    let spec: Vec<crate::cudnn::TowerLayer<'_>> = layers
        .iter()
        .map(|(c, pool)| crate::cudnn::TowerLayer {
            weight: &c.weight,
            bias: &c.bias,
            padding: c.padding,
            stride: c.stride,
            pool: *pool,
        })
        .collect();
    crate::cudnn::tower(x, &spec, nhwc)
}

/// [`run_tower`] layer by layer (one graph node per op).
pub(crate) fn run_tower_by_layers(x: &Tensor, layers: &[(&Conv2d, bool)]) -> Result<Tensor> {
    let mut tower = Tower::new(x.device());
    let mut h = x.clone();
    for (conv, pool) in layers {
        h = if *pool {
            tower.conv_relu_pool(conv, &h)?
        } else {
            tower.conv_relu(conv, &h)?
        };
    }
    tower.finish(&h)
}

/// A convolution tower's layout as it runs: NCHW until the first convolution whose input has
/// a multiple of 8 channels when channels-last is wanted (cuDNN's NHWC tensor-core kernels want
/// that; the 3-channel image layers stay NCHW unless [`crate::cudnn::set_nhwc_image`]),
/// channels-last from there, NCHW again at the end.
#[derive(Debug, Clone, Copy)]
pub struct Tower {
    wanted: bool,
    now: bool,
}

impl Tower {
    /// The layout plan for a tower on `device` ([`channels_last`]).
    pub fn new(device: &candle_core::Device) -> Self {
        Tower {
            wanted: channels_last(device),
            now: false,
        }
    }

    /// `relu(conv(x) + b)`, switching `x` to channels-last first when it is time.
    pub fn conv_relu(&mut self, conv: &Conv2d, x: &Tensor) -> Result<Tensor> {
        let x = self.enter(conv, x)?;
        conv.forward_relu_in(&x, self.now)
    }

    /// `max_pool2(relu(conv(x) + b))` (one op on the fused path), switching `x` to
    /// channels-last first when it is time.
    pub fn conv_relu_pool(&mut self, conv: &Conv2d, x: &Tensor) -> Result<Tensor> {
        let x = self.enter(conv, x)?;
        conv.forward_relu_pool_in(&x, self.now)
    }

    /// `x` in the layout `conv` runs in: permuted to channels-last at the tower's first
    /// convolution with a multiple of 8 input channels (or at its first with
    /// [`crate::cudnn::set_nhwc_image`]) when channels-last is wanted.
    fn enter(&mut self, conv: &Conv2d, x: &Tensor) -> Result<Tensor> {
        if self.wanted && !self.now && crate::cudnn::nhwc_starts_at(conv.weight.dim(1)?) {
            self.now = true;
            return enter_layout(x, true);
        }
        Ok(x.clone())
    }

    /// 2×2 max-pooling in the current layout.
    pub fn pool(&self, x: &Tensor) -> Result<Tensor> {
        max_pool2_in(x, self.now)
    }

    /// Back to (N, C, H, W) for the dense layers.
    pub fn finish(&self, x: &Tensor) -> Result<Tensor> {
        leave_layout(x, self.now)
    }
}

/// Whether the nets should run their convolution towers channels-last on `device`
/// ([`crate::cudnn::set_nhwc`]).
pub fn channels_last(device: &candle_core::Device) -> bool {
    crate::cudnn::nhwc_for(device)
}

/// (N, C, H, W) → the tower's layout: channels-last (N, H, W, C) when `nhwc`.
pub fn enter_layout(x: &Tensor, nhwc: bool) -> Result<Tensor> {
    if nhwc {
        x.permute((0, 2, 3, 1))?.contiguous()
    } else {
        Ok(x.clone())
    }
}

/// The tower's layout → (N, C, H, W), so that flattening for the dense layers (and so the
/// checkpoint's dense weights) is the same in both layouts.
pub fn leave_layout(x: &Tensor, nhwc: bool) -> Result<Tensor> {
    if nhwc {
        x.permute((0, 3, 1, 2))?.contiguous()
    } else {
        Ok(x.clone())
    }
}

/// [`max_pool2`] in the tower's layout.
pub fn max_pool2_in(x: &Tensor, nhwc: bool) -> Result<Tensor> {
    if nhwc {
        crate::cudnn::max_pool2_nhwc(x)
    } else {
        max_pool2(x)
    }
}

/// 2×2 max-pooling with stride 2 (floor), as in both nets. The custom op (cuDNN on CUDA, loops
/// on CPU) everywhere except on CUDA without the fast path, where it is built from candle's
/// reductions ([`crate::cudnn::max_pool2_by_reduction`]; never candle's `max_pool2d`, whose
/// backward is wrong in candle 0.11.1).
pub fn max_pool2(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cuda() && !crate::cudnn::active_for(x.device()) {
        return crate::cudnn::max_pool2_by_reduction(x);
    }
    crate::cudnn::max_pool2(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    /// A small tower of both nets' kinds of layers: in_c → 8 (pool; a 3-channel image layer
    /// stays NCHW, 8 channels go channels-last at once), 8 → 16 (no pool), 16 → 16 stride 2 (pool), on
    /// odd sides (19 → 9 pooled drops a row and a column; 9 → 4 at stride 2 is exact, because
    /// candle's own conv2d backward, the per-layer reference on CPU, gets inexact strides wrong).
    fn layers(vb: &VarBuilder, in_c: usize) -> Vec<(Conv2d, bool)> {
        vec![
            (Conv2d::new(in_c, 8, 3, 1, 1, vb.pp("a")).unwrap(), true),
            (Conv2d::new(8, 16, 3, 1, 1, vb.pp("b")).unwrap(), false),
            (Conv2d::new(16, 16, 3, 0, 2, vb.pp("c")).unwrap(), true),
        ]
    }

    /// Output, input gradient and every parameter gradient of `sum(tower(x) · g)`.
    /// With the image layer channels-last too when `image_nhwc` ([`crate::cudnn::set_nhwc_image`]),
    /// its channels zero-padded to 8 when `padded` ([`crate::cudnn::set_nhwc_image_padded`]).
    fn run_in(
        dev: &Device,
        dtype: DType,
        one_op: bool,
        nhwc: bool,
        (image_nhwc, padded): (bool, bool),
        in_c: usize,
    ) -> Vec<(String, Tensor)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let built = layers(&vb, in_c);
        // deterministic values (the same in every run), non-zero biases (see
        // nets::layout_tests), on `dev` in `dtype`
        let mut named: Vec<(String, Var)> = Vec::new();
        for (name, var) in varmap.data().lock().unwrap().iter() {
            let shape = var.as_tensor().shape().clone();
            let fan_in: usize = shape.dims().iter().skip(1).product::<usize>().max(1);
            let scale = if name.ends_with("bias") {
                0.05
            } else {
                (2.0 / fan_in as f32).sqrt()
            };
            let seed = name
                .bytes()
                .fold(7u64, |h, c| h.wrapping_mul(31).wrapping_add(c as u64));
            let v: Vec<f32> = (0..shape.elem_count())
                .map(|i| {
                    let h = (i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                    (h as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
                        + if name.ends_with("bias") { 0.05 } else { 0.0 }
                })
                .collect();
            let t = Tensor::from_vec(v, shape, dev).unwrap().to_dtype(dtype).unwrap();
            named.push((name.clone(), Var::from_tensor(&t).unwrap()));
        }
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let find = |n: &str| named.iter().find(|(k, _)| k == n).unwrap().1.as_tensor().clone();
        let convs: Vec<(Conv2d, bool)> = ["a", "b", "c"]
            .iter()
            .zip(&built)
            .map(|(p, (c, pool))| {
                let mut c = c.clone();
                c.weight = find(&format!("{p}.weight"));
                c.bias = find(&format!("{p}.bias"));
                (c, *pool)
            })
            .collect();
        let refs: Vec<(&Conv2d, bool)> = convs.iter().map(|(c, p)| (c, *p)).collect();
        let n = 2 * in_c * 19 * 19;
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as u64 * 2_654_435_761) % 1000) as f32 / 1000.0 - 0.3)
            .collect();
        let x = Var::from_vec(v, (2, in_c, 19, 19), &Device::Cpu).unwrap();
        let x = Var::from_tensor(&x.as_tensor().to_device(dev).unwrap().to_dtype(dtype).unwrap()).unwrap();
        let y = crate::cudnn::with_nhwc(nhwc, || {
            crate::cudnn::with_nhwc_image(image_nhwc, || {
                crate::cudnn::with_nhwc_image_padded(padded, || {
                    if one_op {
                        run_tower_as_one_op(x.as_tensor(), &refs, nhwc)
                    } else {
                        run_tower_by_layers(x.as_tensor(), &refs)
                    }
                })
            })
        })
        .unwrap();
        let g: Vec<f32> = (0..y.elem_count())
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 5.0)
            .collect();
        let g = Tensor::from_vec(g, y.shape(), &Device::Cpu)
            .unwrap()
            .to_device(dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let mut out = vec![
            ("y".to_string(), y.clone()),
            ("dx".to_string(), grads.get(x.as_tensor()).unwrap().clone()),
        ];
        for (name, var) in &named {
            out.push((
                format!("d{name}"),
                grads.get(var.as_tensor()).expect("parameter gradient").clone(),
            ));
        }
        out
    }

    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = crate::testutil::max_abs_diff(a, b);
        let s = crate::testutil::max_abs_diff(b, &b.zeros_like().unwrap());
        d / s.max(1e-12)
    }

    /// The tower as one autograd node, NCHW and channels-last, and the per-layer graph in
    /// channels-last, each against the per-layer NCHW graph (on the CPU: candle's own conv,
    /// ReLU and autograd): output, input gradient and every parameter gradient, on `dev`, for a
    /// 3-channel input (channels-last from the second layer) and an 8-channel one (from the
    /// first, so the input gradient comes back through the layout switch); and for the
    /// 3-channel input with the image layer channels-last too, as it is and zero-padded to 8
    /// channels (the tower op only); channels-last also with the pooled layers keeping their
    /// pooling masks instead of their ReLU outputs ([`crate::cudnn::set_pool_mask`]).
    pub(crate) fn tower_op_matches_layers_on(dev: &Device, dtype: DType, tol: f32) {
        for in_c in [3, 8] {
            let reference = run_in(dev, dtype, false, false, (false, false), in_c);
            let no = (false, false);
            // (one op, channels-last, image layer channels-last / padded, pooling masks)
            let mut plans = vec![
                (true, false, no, false),
                (true, true, no, false),
                (false, true, no, false),
                (true, true, no, true),
                (false, true, no, true),
            ];
            if in_c % 8 != 0 {
                // the image layer channels-last, as it is and zero-padded to 8 channels
                plans.extend([
                    (true, true, (true, false), false),
                    (false, true, (true, false), false),
                    (true, true, (true, true), false),
                    (true, true, (true, true), true),
                ]);
            }
            for (one_op, nhwc, image_nhwc, mask) in plans {
                let a = crate::cudnn::with_pool_mask(mask, || run_in(dev, dtype, one_op, nhwc, image_nhwc, in_c));
                assert_eq!(a.len(), reference.len());
                for ((name, ta), (_, tb)) in a.iter().zip(&reference) {
                    assert_eq!(ta.dims(), tb.dims(), "{name}");
                    let e = rel(ta, tb);
                    assert!(
                        e < tol,
                        "{name} (one op {one_op}, nhwc {nhwc}, image nhwc / padded {image_nhwc:?}, pooling \
                         masks {mask}, {in_c} channels, {dtype:?}): relative error {e}"
                    );
                }
            }
        }
    }

    /// Inside [`no_grad`] the tower op builds no graph node even with variable weights (a
    /// model in training: validation kept every batch's activations), with the same output;
    /// outside it does; the flag is restored after a panic.
    #[test]
    fn no_grad_builds_no_tower_node() {
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let a = Conv2d::new(3, 8, 3, 1, 1, vb.pp("a")).unwrap();
        let b = Conv2d::new(8, 8, 3, 1, 1, vb.pp("b")).unwrap();
        let layers = [(&a, true), (&b, false)];
        let x = Tensor::rand(0f32, 1., (2, 3, 10, 10), &Device::Cpu).unwrap();
        let tracked = run_tower_as_one_op(&x, &layers, true).unwrap();
        assert!(tracked.track_op());
        let free = no_grad(|| run_tower_as_one_op(&x, &layers, true)).unwrap();
        assert!(!free.track_op());
        assert_eq!(crate::testutil::max_abs_diff(&tracked, &free), 0.0);
        assert!(grad_enabled());
        let r = std::panic::catch_unwind(|| no_grad(|| panic!("inside")));
        assert!(r.is_err() && grad_enabled());
        assert!(run_tower_as_one_op(&x, &layers, true).unwrap().track_op());
    }

    #[test]
    fn tower_op_matches_layers() {
        tower_op_matches_layers_on(&Device::Cpu, DType::F32, 1e-5);
    }

    /// The same on the GPU with the fast path's kernels (strict f32 math). Skipped without one.
    #[cfg(feature = "cudnn")]
    #[test]
    fn cuda_tower_op_matches_layers() {
        let Some(gpu) = crate::testutil::gpu() else { return };
        crate::cudnn::set_fused(true);
        crate::cudnn::set_allow_tf32(false);
        let r = std::panic::catch_unwind(|| tower_op_matches_layers_on(&gpu, DType::F32, 1e-4));
        crate::cudnn::set_allow_tf32(true);
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
    }
}
