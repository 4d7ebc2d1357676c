//! Inverted dropout as one custom op with a counter-based mask ([`dropout`]): element i of a
//! call with seed s is kept when the top 24 bits of `mix64(s + (i + 1)·φ)` (splitmix64's
//! finaliser, φ = 0x9e3779b97f4a7c15) are below `round(keep · 2²⁴)`, and scaled by `1 / keep`.
//!
//! Against candle's way (a uniform tensor from the device generator, a comparison, a cast, a
//! scale and a product, then the product again backward, with the mask kept for the backward
//! pass), this is one kernel forward and the same kernel backward (dropout is linear, and the
//! mask is a function of the seed: nothing is stored), and the mask is the same on CPU and GPU
//! for a seed, so the caller's host RNG (one `u64` a call) fully determines it, resume
//! included. The kernel is `src/kernels/dropout.cu`; the CPU path is the same hash in Rust.
//! The nets use it on the CUDA fast path ([`crate::cudnn::fused_enabled`], on by default);
//! elsewhere they keep their host-generated masks, so CPU training is unchanged.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};

/// splitmix64's finaliser (as `mix64` in dropout.cu).
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Whether element `i` survives a call with `seed` and `threshold`.
fn kept(seed: u64, i: u64, threshold: u32) -> bool {
    ((mix64(seed.wrapping_add((i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))) >> 40) as u32) < threshold
}

/// `x` with each element dropped with probability `p` (0 ≤ p < 1) and the rest scaled by
/// 1 / (1 − p); the mask is a function of `seed` and the element index (see the module doc).
/// Differentiable; the gradient is the same mask and scale on the incoming gradient.
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability must be in [0, 1), got {p}");
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    x.contiguous()?.apply_op1(Dropout::new(p, seed))
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Dropout {
    pub(crate) seed: u64,
    /// round(keep · 2²⁴): an element is kept when its 24-bit hash is below it.
    pub(crate) threshold: u32,
    /// 1 / keep, in f32 as the kernel multiplies.
    pub(crate) scale: f32,
}

impl Dropout {
    pub(crate) fn new(p: f32, seed: u64) -> Self {
        let keep = 1.0 - f64::from(p);
        Self {
            seed,
            threshold: (keep * f64::from(1u32 << 24)).round() as u32,
            scale: (1.0 / keep) as f32,
        }
    }

    /// The factor of element i: `scale` if kept, else 0. The op multiplies by it (rather than
    /// writing 0), so a NaN or infinity in a dropped element still shows, as with candle's
    /// `x * mask`.
    fn factor(&self, i: usize) -> f32 {
        if kept(self.seed, i as u64, self.threshold) {
            self.scale
        } else {
            0.0
        }
    }

    /// The f32 product, then one rounding to T by `round` (the type's own f32 conversion:
    /// `half`'s bf16 `from_f64` drops the low 32 mantissa bits before rounding, so going
    /// through f64 would not round an f32 value as the kernel's `__float2bfloat16_rn` does).
    fn cpu<T: WithDType>(&self, x: &[T], round: impl Fn(f32) -> T) -> Vec<T> {
        x.iter()
            .enumerate()
            .map(|(i, v)| round(v.to_f64() as f32 * self.factor(i)))
            .collect()
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "gz-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("gz-dropout: input is not contiguous");
        };
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.cpu(&v[a..b], |y| y)),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.cpu(&v[a..b], half::bf16::from_f32)),
            CpuStorage::F16(v) => CpuStorage::F16(self.cpu(&v[a..b], half::f16::from_f32)),
            // f64 stays f64 (no CUDA kernel takes it)
            CpuStorage::F64(v) => CpuStorage::F64(
                v[a..b]
                    .iter()
                    .enumerate()
                    .map(|(i, x)| x * f64::from(self.factor(i)))
                    .collect(),
            ),
            other => candle_core::bail!("gz-dropout supports f32, bf16, f16 and f64, not {:?}", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    #[allow(unused_variables, reason = "the arguments are only used with the cudnn feature")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cudnn")]
        {
            Ok((cuda::launch(self, s, l)?, l.shape().clone()))
        }
        #[cfg(not(feature = "cudnn"))]
        candle_core::bail!("gz-dropout: this build has no CUDA kernels (build gz-model with the `cudnn` feature)")
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        // linear in x with the same mask: the backward pass is the op itself on dy
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// (grid, block) of the kernel: grid-stride over `n` values, 256 threads a block (shared by the
/// CUDA launcher and the emulator test, `dropout/emu_tests.rs`).
#[cfg_attr(
    not(any(feature = "cudnn", test)),
    allow(dead_code, reason = "used by the CUDA launcher and the emulator tests")
)]
pub(crate) fn grid(n: u64) -> ((u32, u32, u32), (u32, u32, u32)) {
    (((n.div_ceil(256 * 4)).clamp(1, 1 << 16) as u32, 1, 1), (256, 1, 1))
}

#[cfg(feature = "cudnn")]
mod cuda {
    //! The launch of `src/kernels/dropout.cu`.

    use candle_core::backend::BackendStorage;
    use candle_core::cuda::CudaDType;
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};
    use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

    use super::Dropout;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx"));

    pub(super) fn launch(op: &Dropout, s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
        let dev = s.device().clone();
        match s.dtype() {
            DType::F32 => go::<f32>(&dev, op, s, l, "f32"),
            DType::BF16 => go::<half::bf16>(&dev, op, s, l, "bf16"),
            DType::F16 => go::<half::f16>(&dev, op, s, l, "f16"),
            other => candle_core::bail!("gz-dropout on CUDA supports f32, bf16 and f16, not {other:?}"),
        }
    }

    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        op: &Dropout,
        s: &CudaStorage,
        l: &Layout,
        sfx: &str,
    ) -> Result<CudaStorage> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("gz-dropout: input is not contiguous");
        };
        let slice = s.as_cuda_slice::<T>()?;
        if b > slice.len() {
            candle_core::bail!("gz-dropout: view {a}..{b} exceeds storage of {}", slice.len());
        }
        let x = slice.slice(a..b);
        let n = (b - a) as u64;
        // SAFETY: the kernel writes every one of the n values (grid-stride over n).
        let y = unsafe { dev.alloc::<T>(b - a) }?;
        let func = dev.get_or_load_custom_func(&format!("gz_dropout_{sfx}"), "gz_dropout", PTX)?;
        let (grid_dim, block_dim) = super::grid(n);
        let cfg = LaunchConfig {
            grid_dim,
            block_dim,
            shared_mem_bytes: 0,
        };
        let mut builder = func.builder();
        builder
            .arg(&x)
            .arg(&y)
            .arg(&n)
            .arg(&op.seed)
            .arg(&op.threshold)
            .arg(&op.scale);
        // SAFETY: argument types and count match `gz_dropout_*` in dropout.cu (const T*, T*,
        // u64 n, u64 seed, u32 threshold, f32 scale); x and y hold n values.
        unsafe { builder.launch(cfg) }
            .map_err(|e| candle_core::Error::Cuda(format!("gz-dropout launch: {e:?}").into()))?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
}

#[cfg(test)]
mod emu_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn keeps_the_right_fraction_and_scales() -> Result<()> {
        let x = Tensor::ones(100_000, DType::F32, &Device::Cpu)?;
        for p in [0.1f32, 0.5, 0.8] {
            let y = dropout(&x, p, 7)?.to_vec1::<f32>()?;
            let kept: Vec<f32> = y.iter().copied().filter(|v| *v != 0.0).collect();
            let frac = kept.len() as f64 / y.len() as f64;
            assert!((frac - (1.0 - f64::from(p))).abs() < 0.01, "p {p}: kept {frac}");
            assert!(kept.iter().all(|v| (*v - 1.0 / (1.0 - p)).abs() < 1e-6));
            // the mean is preserved in expectation
            let mean = y.iter().map(|v| f64::from(*v)).sum::<f64>() / y.len() as f64;
            assert!((mean - 1.0).abs() < 0.03, "p {p}: mean {mean}");
        }
        Ok(())
    }

    #[test]
    fn same_seed_same_mask_other_seed_other_mask() -> Result<()> {
        let x = Tensor::arange(1f32, 1001.0, &Device::Cpu)?;
        let a = dropout(&x, 0.5, 1)?.to_vec1::<f32>()?;
        let b = dropout(&x, 0.5, 1)?.to_vec1::<f32>()?;
        let c = dropout(&x, 0.5, 2)?.to_vec1::<f32>()?;
        assert_eq!(a, b);
        assert_ne!(a, c);
        // neighbouring elements are not correlated: about a quarter of pairs both kept
        let both = a.windows(2).filter(|w| w[0] != 0.0 && w[1] != 0.0).count();
        assert!((180..320).contains(&both), "{both} of 999 neighbouring pairs both kept");
        Ok(())
    }

    #[test]
    fn gradient_is_the_same_mask() -> Result<()> {
        let x = Var::from_tensor(&Tensor::arange(1f32, 65.0, &Device::Cpu)?.reshape((8, 8))?)?;
        let y = dropout(x.as_tensor(), 0.3, 99)?;
        let g = Tensor::arange(0f32, 64.0, &Device::Cpu)?.reshape((8, 8))?;
        let grads = (&y * &g)?.sum_all()?.backward()?;
        let dx = grads.get(x.as_tensor()).expect("dx").flatten_all()?.to_vec1::<f32>()?;
        let (yv, xv, gv) = (
            y.flatten_all()?.to_vec1::<f32>()?,
            x.as_tensor().flatten_all()?.to_vec1::<f32>()?,
            g.flatten_all()?.to_vec1::<f32>()?,
        );
        for i in 0..64 {
            // y = x·m·s, so dL/dx = g·m·s = g·y/x
            let want = gv[i] * yv[i] / xv[i];
            assert!((dx[i] - want).abs() < 1e-4, "element {i}: {} vs {want}", dx[i]);
        }
        assert!(yv.contains(&0.0) && yv.iter().any(|v| *v != 0.0));
        Ok(())
    }

    /// The kernel on a GPU against the CPU path: the same hash, so the same values to the
    /// bit, forward and backward, in every storage type. Skipped without a GPU.
    #[cfg(feature = "cudnn")]
    #[test]
    fn cuda_dropout_matches_cpu_to_the_bit() -> Result<()> {
        let Some(gpu) = crate::testutil::gpu() else {
            return Ok(());
        };
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = Tensor::randn(0f32, 1.0, (97, 103), &Device::Cpu)?.to_dtype(dtype)?;
            let g = Tensor::randn(0f32, 1.0, (97, 103), &Device::Cpu)?.to_dtype(dtype)?;
            let run = |dev: &Device| -> Result<(Tensor, Tensor)> {
                let xv = Var::from_tensor(&x.to_device(dev)?)?;
                let y = dropout(xv.as_tensor(), 0.3, 42)?;
                let grads = (y.to_dtype(DType::F32)? * g.to_device(dev)?.to_dtype(DType::F32)?)?
                    .sum_all()?
                    .backward()?;
                let dx = grads.get(xv.as_tensor()).expect("dx").clone();
                Ok((y.to_device(&Device::Cpu)?, dx.to_device(&Device::Cpu)?))
            };
            let (cy, cdx) = run(&Device::Cpu)?;
            let (gy, gdx) = run(&gpu)?;
            assert_eq!(crate::testutil::max_abs_diff(&cy, &gy), 0.0, "{dtype:?} y");
            assert_eq!(crate::testutil::max_abs_diff(&cdx, &gdx), 0.0, "{dtype:?} dx");
        }
        Ok(())
    }

    #[test]
    fn a_nan_shows_even_where_dropped() -> Result<()> {
        let x = Tensor::full(f32::NAN, 64, &Device::Cpu)?;
        let y = dropout(&x, 0.5, 3)?.to_vec1::<f32>()?;
        assert!(y.iter().all(|v| v.is_nan()));
        Ok(())
    }

    #[test]
    fn bad_probability_is_an_error() {
        let x = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        assert!(dropout(&x, 1.0, 0).is_err());
        assert!(dropout(&x, -0.1, 0).is_err());
        assert_eq!(dropout(&x, 0.0, 0).unwrap().to_vec1::<f32>().unwrap(), [1.0; 4]);
    }
}
