//! gz-model: the candle networks and their trainer.
//!
//! - [`config`]: `ModelConfig` (architecture, output layer, sizes) — a serde value that is part
//!   of the checkpoint sidecar, so inference rebuilds the exact model.
//! - [`nets`]: `vgg16-blog` (the Keras blog baseline), `dieleman` (after Dieleman et al. 2015,
//!   "Rotation-invariant convolutional neural networks for galaxy morphology prediction") and
//!   `tiny` variants for CPU tests.
//! - [`tree`]: the decision-tree output layer, usable by any model.
//! - [`augment`]: affine resampling on the device (augmentation, TTA, Dieleman's views/parts).
//! - [`ops`]: the convolution and pooling layers the nets use, as [`cudnn`]'s custom ops: cuDNN
//!   on CUDA with the `cudnn` feature; on the CPU the same ops run gz's own f32 convolution
//!   ([`cpu_conv`]: im2col + `gemm`, Winograd for the larger 3×3 layers).
//! - [`device`]: `select_device` and the CPU thread count.
//! - [`train`], [`checkpoint`], [`optim`], [`data`], [`parts`]: the trainer ([`parts`]: a CPU
//!   batch trained as parts side by side).
//!
//! Only this crate (and gz-eval through it) depends on candle.

pub mod augment;
pub mod checkpoint;
pub mod config;
pub mod cpu_conv;
pub(crate) mod cpu_features;
pub mod cudnn;
pub mod data;
pub mod device;
pub mod dropout;
pub mod grad_sink;
pub mod kernel_trace;
pub mod nets;
pub mod ops;
pub mod optim;
pub mod parts;
pub mod train;
pub mod tree;

#[cfg(test)]
mod launch_signatures;

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

    /// A var map's tensors by name (to build a second model with the same weights through
    /// `VarBuilder::from_tensors`, on another device or in another dtype).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code, reason = "used by the CUDA tests"))]
    pub(crate) fn varmap_tensors(varmap: &candle_nn::VarMap) -> std::collections::HashMap<String, Tensor> {
        varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
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

    /// Buffers for the emulator tests (kernels run on the CPU by `gz-kernel-emu`): the values
    /// with guard values on both sides, so a kernel writing out of bounds fails the test, and a
    /// NaN fill for outputs, so an element the kernel never writes (on the GPU: uninitialised
    /// memory) fails it too.
    pub(crate) mod emu {
        use candle_core::WithDType;

        const GUARD: usize = 64;
        /// Exactly representable in f32, bf16 and f16, never an output of the tests' kernels,
        /// and large and positive, so that a kernel reading past an input carries it through a
        /// ReLU or a max into its output, where the comparison with the reference sees it.
        const GUARD_VALUE: f64 = 4096.0;

        /// The values start 16-byte aligned, as CUDA's allocations are (the vectorised kernels
        /// load 16 bytes at a time), after at least `GUARD` guard values.
        pub(crate) struct Buf<T: WithDType> {
            data: Vec<T>,
            lead: usize,
            len: usize,
        }

        impl<T: WithDType> Buf<T> {
            pub(crate) fn new(values: &[T]) -> Self {
                let g = T::from_f64(GUARD_VALUE);
                let size = std::mem::size_of::<T>();
                let spare = 16usize.div_ceil(size);
                let mut data = Vec::with_capacity(GUARD + spare + values.len() + GUARD);
                data.resize(GUARD + spare, g);
                // guard values up to the first 16-byte boundary past GUARD of them
                let misaligned = (data.as_ptr() as usize + GUARD * size) % 16;
                let lead = GUARD + if misaligned == 0 { 0 } else { (16 - misaligned) / size };
                data.truncate(lead);
                data.extend_from_slice(values);
                data.extend(std::iter::repeat_n(g, GUARD));
                debug_assert_eq!(data[lead..].as_ptr() as usize % 16, 0);
                Self {
                    data,
                    lead,
                    len: values.len(),
                }
            }

            /// An output of `len` values, all NaN until the kernel writes them.
            pub(crate) fn out(len: usize) -> Self {
                Self::new(&vec![T::from_f64(f64::NAN); len])
            }

            pub(crate) fn ptr(&self) -> *const T {
                self.data[self.lead..].as_ptr()
            }

            pub(crate) fn mut_ptr(&mut self) -> *mut T {
                self.data[self.lead..].as_mut_ptr()
            }

            /// The values, after checking the guards are intact and (`written`) that no NaN is
            /// left.
            pub(crate) fn values(&self, name: &str, written: bool) -> &[T] {
                let g = T::from_f64(GUARD_VALUE);
                let (head, rest) = self.data.split_at(self.lead);
                let (body, tail) = rest.split_at(self.len);
                for (side, guard) in [("before", head), ("after", tail)] {
                    if let Some(i) = guard.iter().position(|v| *v != g) {
                        panic!(
                            "{name}: the kernel wrote {} guard values {side} the buffer (first at {i})",
                            guard.iter().filter(|v| **v != g).count()
                        );
                    }
                }
                if written {
                    if let Some(i) = body.iter().position(|v| v.to_f64().is_nan()) {
                        let missing = body.iter().filter(|v| v.to_f64().is_nan()).count();
                        panic!(
                            "{name}: {missing} of {} values never written (first at {i})",
                            body.len()
                        );
                    }
                }
                body
            }
        }

        /// Fails the test at the first value of `got` whose bits differ from `want`'s (values
        /// compared as f64, which every storage type converts to exactly), naming `what`.
        pub(crate) fn assert_same_bits<T: WithDType>(what: &str, got: &[T], want: &[T]) {
            assert_eq!(got.len(), want.len(), "{what}: lengths");
            if let Some(i) = got
                .iter()
                .zip(want)
                .position(|(a, b)| a.to_f64().to_bits() != b.to_f64().to_bits())
            {
                panic!(
                    "{what}: element {i} is {} on the kernel, {} in the reference",
                    got[i].to_f64(),
                    want[i].to_f64()
                );
            }
        }

        /// Runs one launch in the emulator, failing the test with the emulator's message.
        pub(crate) fn run(what: &str, grid: (u32, u32, u32), block: (u32, u32, u32), f: impl Fn()) {
            if let Err(e) = gz_kernel_emu::launch(grid, block, f) {
                panic!("{what}: grid {grid:?}, block {block:?}: {e}");
            }
        }

        /// An output buffer of an out-of-place kernel, for [`run_both`].
        pub(crate) trait Output {
            /// The values (as f64; NaN for unwritten).
            fn snapshot(&self) -> Vec<f64>;
            /// Sets every value back to NaN, in place (the kernel's pointers stay valid).
            fn poison(&mut self);
        }

        impl<T: WithDType> Output for Buf<T> {
            fn snapshot(&self) -> Vec<f64> {
                self.data[self.lead..self.lead + self.len]
                    .iter()
                    .map(|v| v.to_f64())
                    .collect()
            }
            fn poison(&mut self) {
                let nan = T::from_f64(f64::NAN);
                self.data[self.lead..self.lead + self.len]
                    .iter_mut()
                    .for_each(|v| *v = nan);
            }
        }

        /// [`run`] for an out-of-place kernel, twice: blocks and threads in order, then in
        /// reverse order ([`gz_kernel_emu::Order`]) with `outputs` poisoned in between. The two
        /// results must be identical to the bit, or the kernel's outputs depend on the order of
        /// blocks or threads (a race on the GPU).
        pub(crate) fn run_both(
            what: &str,
            grid: (u32, u32, u32),
            block: (u32, u32, u32),
            outputs: &mut [&mut dyn Output],
            f: impl Fn(),
        ) {
            run(what, grid, block, &f);
            let first: Vec<Vec<f64>> = outputs.iter().map(|o| o.snapshot()).collect();
            outputs.iter_mut().for_each(|o| o.poison());
            if let Err(e) = gz_kernel_emu::launch_in(gz_kernel_emu::Order::Reverse, grid, block, &f) {
                panic!("{what} (reverse order): grid {grid:?}, block {block:?}: {e}");
            }
            for (i, (o, a)) in outputs.iter().zip(&first).enumerate() {
                let b = o.snapshot();
                let same = |x: &f64, y: &f64| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan());
                if let Some(k) = a.iter().zip(&b).position(|(x, y)| !same(x, y)) {
                    panic!(
                        "{what}: output {i}[{k}] is {} with blocks in order and {} in reverse order: the \
                         result depends on the order of blocks or threads",
                        a[k], b[k]
                    );
                }
            }
        }

        /// The largest |a − b| relative to max(|b|, floor), and where.
        pub(crate) fn worst<T: WithDType>(a: &[T], b: &[T], floor: f64) -> (f64, usize) {
            assert_eq!(a.len(), b.len());
            let scale = b.iter().fold(floor, |m, v| m.max(v.to_f64().abs()));
            a.iter()
                .zip(b)
                .map(|(x, y)| (x.to_f64() - y.to_f64()).abs() / scale)
                .enumerate()
                .fold((0.0, 0), |(w, at), (i, d)| if d > w { (d, i) } else { (w, at) })
        }

        /// Deterministic pseudo-random values in [-scale, scale) (xorshift).
        pub(crate) fn values(seed: u64, n: usize, scale: f64) -> Vec<f64> {
            let mut state = seed | 1;
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 2.0 * scale
                })
                .collect()
        }
    }
}
