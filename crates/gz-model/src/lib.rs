//! gz-model: the candle networks and their trainer.
//!
//! - [`config`]: `ModelConfig` (architecture, output layer, sizes) — a serde value that is part
//!   of the checkpoint sidecar, so inference rebuilds the exact model.
//! - [`nets`]: `vgg16-blog` (the Keras blog baseline), `dieleman` (after Dieleman et al. 2015,
//!   "Rotation-invariant convolutional neural networks for galaxy morphology prediction") and
//!   `tiny` variants for CPU tests.
//! - [`tree`]: the decision-tree output layer, usable by any model.
//! - [`augment`]: affine resampling on the device (augmentation, TTA, Dieleman's views/parts).
//! - [`ops`]: the convolution and pooling layers the nets use; on CUDA with the `cudnn`
//!   feature they call cuDNN, elsewhere candle's own kernels.
//! - [`device`]: `select_device`.
//! - [`train`], [`checkpoint`], [`optim`], [`data`]: the trainer.
//!
//! Only this crate (and gz-eval through it) depends on candle.

pub mod augment;
pub mod checkpoint;
pub mod config;
pub mod cudnn;
pub mod data;
pub mod device;
pub mod nets;
pub mod ops;
pub mod optim;
pub mod train;
pub mod tree;

#[cfg(test)]
pub(crate) mod testutil {
    //! Helpers shared by the unit tests.

    use candle_core::{DType, Device, Tensor};

    /// The largest |a − b| over two same-shaped tensors (any device, any float dtype), in f32.
    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a = a.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
        let b = b.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }
}
