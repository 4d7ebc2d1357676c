//! Convolution and pooling layers used by every net in [`crate::nets`].
//!
//! The nets never call candle's `conv2d` directly: they build [`Conv2d`] here, so the fast
//! CUDA path (cuDNN behind a candle custom op, `cudnn` feature) can replace the kernel without
//! touching model code. On CPU, and on CUDA without the feature, this is candle's convolution.
//! Parameter names (`weight`, `bias`) match `candle_nn::Conv2d`, so checkpoints are the same
//! whichever path trained them.

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
        let init = candle_nn::Init::Randn { mean: 0.0, stdev: (2.0 / fan_in).sqrt() };
        let weight = vb.get_with_hints((out_c, in_c, k, k), "weight", init)?;
        let bias = vb.get_with_hints(out_c, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self { weight, bias, padding, stride })
    }

    /// The weight tensor (out, in, k, k).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

/// 2×2 max-pooling with stride 2 (floor), as in both nets.
pub fn max_pool2(x: &Tensor) -> Result<Tensor> {
    x.max_pool2d(2)
}
