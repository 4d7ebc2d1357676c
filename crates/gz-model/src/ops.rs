//! Convolution and pooling layers used by every net in [`crate::nets`].
//!
//! The nets never call candle's `conv2d` directly: they build [`Conv2d`] here, so the fast
//! CUDA path (cuDNN behind candle custom ops, [`crate::cudnn`], `cudnn` feature) replaces the
//! kernels without touching model code. On CPU, and on CUDA without the feature or with the
//! fast path switched off ([`crate::cudnn::set_enabled`]), convolution is candle's own.
//! Parameter names (`weight`, `bias`) match `candle_nn::Conv2d`, so checkpoints are the same
//! whichever path trained them, and a checkpoint trained on the fast path predicts the same on
//! CPU.
//!
//! [`max_pool2`] uses the custom max-pool op on CPU too, and never candle's `max_pool2d`: in
//! candle 0.11.1 its backward gives a window's unique maximum a quarter of the gradient and
//! misroutes gradients when a side is odd (see [`crate::cudnn`]).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

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
        if crate::cudnn::active_for(x.device()) && crate::cudnn::fused_enabled() {
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
        if crate::cudnn::active_for(x.device()) && crate::cudnn::fused_enabled() {
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
        if crate::cudnn::active_for(x.device()) {
            return crate::cudnn::conv2d(x, &self.weight, &self.bias, self.padding, self.stride);
        }
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

/// A convolution tower's layout as it runs: NCHW until the first convolution whose input has
/// a multiple of 8 channels when channels-last is wanted (cuDNN's NHWC tensor-core kernels want
/// that; the 3-channel image layers stay NCHW), channels-last from there, NCHW again at the end.
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
    /// convolution with a multiple of 8 input channels when channels-last is wanted.
    fn enter(&mut self, conv: &Conv2d, x: &Tensor) -> Result<Tensor> {
        if self.wanted && !self.now && conv.weight.dim(1)? % 8 == 0 {
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
