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

    /// The GPU for one CUDA test, held exclusively: the fast path's switches (fused kernels,
    /// channels-last, TF32, the cuDNN path itself) are process-wide and several tests flip them,
    /// so CUDA tests in this crate run one at a time whatever `--test-threads` says. The device
    /// is tuned as `gz` tunes it ([`crate::device::tune_cuda`]). `None`
    /// (the test then passes, saying so) without a GPU, unless `GZ_REQUIRE_CUDA` is set.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code, reason = "used by the CUDA tests"))]
    pub(crate) struct Gpu {
        pub(crate) dev: Device,
        _exclusive: std::sync::MutexGuard<'static, ()>,
    }

    impl std::ops::Deref for Gpu {
        type Target = Device;
        fn deref(&self) -> &Device {
            &self.dev
        }
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code, reason = "used by the CUDA tests"))]
    pub(crate) fn gpu() -> Option<Gpu> {
        static EXCLUSIVE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let guard = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
        // tuned as `gz` opens its devices, so the tests check what ships
        match Device::new_cuda(0).and_then(|d| crate::device::tune_cuda(&d).map(|()| d)) {
            Ok(dev) => Some(Gpu { dev, _exclusive: guard }),
            Err(e) => {
                assert!(
                    std::env::var("GZ_REQUIRE_CUDA").is_err(),
                    "GZ_REQUIRE_CUDA is set but CUDA is unavailable: {e}"
                );
                eprintln!("no CUDA device, skipping: {e}");
                None
            }
        }
    }

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
