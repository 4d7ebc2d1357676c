//! NCHW ↔ channels-last (NHWC) layout changes of the channels-last towers as one tiled
//! transpose kernel (`src/kernels/layout.cu`) on CUDA, instead of candle's strided copy.
//!
//! Both directions are a batched 2-D transpose, `dst[b][j][i] = src[b][i][j]` for a
//! (batch, rows, cols) source: NCHW → NHWC is (N, C, H·W), NHWC → NCHW is (N, H·W, C), and
//! (K, C, R, S) filters → (K, R, S, C) is (K, C, R·S). candle's `permute(..).contiguous()` on
//! CUDA computes every element's source index with a 64-bit division per dimension and reads
//! the source H·W elements apart between neighbouring threads; the kernel moves 32×32 tiles
//! through shared memory with coalesced reads and writes, and moves the values as bits (exact).
//! The towers change layout once per step each way on their largest activations (VGG16-blog's
//! first convolution output: 184 MB per bf16 step at batch 256) and on every filter and filter
//! gradient.
//!
//! On the CPU, and for dtypes or sizes the kernel does not take, the layout change is candle's
//! permute; [`set_enabled`]`(false)` (`GZ_LAYOUT_KERNEL=0` in `gz`) uses it on CUDA too, for
//! comparisons. The kernel's indexing is checked on the CPU by the emulator (`emu_tests`), its
//! launch on a GPU by `cudnn::tests::cuda_layout_kernel_matches_permute`.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Uses the transpose kernel for CUDA layout changes (on by default) or candle's strided copy.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// A CUDA grid or block size (x, y, z).
pub(crate) type Dim3 = (u32, u32, u32);

/// Threads of a block: 32 columns × 8 rows, each thread moving 4 values of a 32×32 tile.
pub(crate) const BLOCK: Dim3 = (32, 8, 1);

/// (grid, block) of a (batch, rows, cols) transpose, or `None` when the grid would exceed
/// CUDA's limits (more than 65,535 tiles down the rows); blocks loop over the batch beyond
/// 65,535 images. Shared by the CUDA launcher and the emulator tests.
#[cfg_attr(
    not(any(feature = "cudnn", test)),
    allow(dead_code, reason = "used by the CUDA launcher and the emulator tests")
)]
pub(crate) fn grid(batch: usize, rows: usize, cols: usize) -> Option<(Dim3, Dim3)> {
    let gx = cols.div_ceil(32);
    let gy = rows.div_ceil(32);
    if batch == 0 || gx == 0 || gy == 0 || gx > i32::MAX as usize || gy > 65_535 {
        return None;
    }
    // every index inside the kernel is a u32 except the image offset (size_t)
    if rows > u32::MAX as usize || cols > u32::MAX as usize || batch > u32::MAX as usize {
        return None;
    }
    let gz = batch.min(65_535);
    Some(((gx as u32, gy as u32, gz as u32), BLOCK))
}

/// `t` (batch, rows, cols) → (batch, cols, rows), contiguous, with the result given
/// `out_shape` (the same element count). The kernel on CUDA where it applies, candle's permute
/// otherwise. The kernel is not an autograd node, so a tensor in a graph (`track_op`) takes the
/// permute: the towers' detached activations, filters and gradients take the kernel.
pub(crate) fn transpose(t: &Tensor, batch: usize, rows: usize, cols: usize, out_shape: &[usize]) -> Result<Tensor> {
    let kernel = t.device().is_cuda()
        && !t.track_op()
        && cfg!(feature = "cudnn")
        && ENABLED.load(Ordering::Relaxed)
        && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && grid(batch, rows, cols).is_some();
    let t = t.reshape((batch, rows, cols))?;
    let y = if kernel {
        t.contiguous()?.apply_op1_no_bwd(&Transpose)?
    } else {
        t.transpose(1, 2)?.contiguous()?
    };
    y.reshape(out_shape)
}

/// The kernel as a candle op on a contiguous (batch, rows, cols) tensor. The CPU side (loops)
/// exists for completeness; [`transpose`] sends CPU tensors to candle's permute.
struct Transpose;

impl CustomOp1 for Transpose {
    fn name(&self) -> &'static str {
        "gz-transpose"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (batch, rows, cols) = l.shape().dims3()?;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("gz-transpose: input is not contiguous");
        };
        fn go<T: Copy>(v: &[T], batch: usize, rows: usize, cols: usize) -> Vec<T> {
            let mut out = Vec::with_capacity(v.len());
            for img in v.chunks_exact(rows * cols).take(batch) {
                for j in 0..cols {
                    out.extend((0..rows).map(|i| img[i * cols + j]));
                }
            }
            out
        }
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(go(&v[a..b], batch, rows, cols)),
            CpuStorage::BF16(v) => CpuStorage::BF16(go(&v[a..b], batch, rows, cols)),
            CpuStorage::F16(v) => CpuStorage::F16(go(&v[a..b], batch, rows, cols)),
            other => candle_core::bail!("gz-transpose supports f32, bf16 and f16, not {:?}", other.dtype()),
        };
        Ok((out, Shape::from((batch, cols, rows))))
    }

    #[allow(unused_variables, reason = "the arguments are only used with the cudnn feature")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cudnn")]
        {
            let (batch, rows, cols) = l.shape().dims3()?;
            Ok((cuda::launch(s, l)?, Shape::from((batch, cols, rows))))
        }
        #[cfg(not(feature = "cudnn"))]
        candle_core::bail!("gz-transpose: this build has no CUDA kernels (build gz-model with the `cudnn` feature)")
    }
}

#[cfg(feature = "cudnn")]
mod cuda {
    //! The launch of `src/kernels/layout.cu`.

    use candle_core::backend::BackendStorage;
    use candle_core::cuda::CudaDType;
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};
    use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/layout.ptx"));

    pub(super) fn launch(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
        let dev = s.device().clone();
        match s.dtype() {
            DType::F32 => go::<f32>(&dev, s, l, "b32"),
            DType::BF16 => go::<half::bf16>(&dev, s, l, "b16"),
            DType::F16 => go::<half::f16>(&dev, s, l, "b16"),
            other => candle_core::bail!("gz-transpose on CUDA supports f32, bf16 and f16, not {other:?}"),
        }
    }

    fn go<T: CudaDType + DeviceRepr>(dev: &CudaDevice, s: &CudaStorage, l: &Layout, sfx: &str) -> Result<CudaStorage> {
        let (batch, rows, cols) = l.shape().dims3()?;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("gz-transpose: input is not contiguous");
        };
        let slice = s.as_cuda_slice::<T>()?;
        if b > slice.len() {
            candle_core::bail!("gz-transpose: view {a}..{b} exceeds storage of {}", slice.len());
        }
        let Some((grid_dim, block_dim)) = super::grid(batch, rows, cols) else {
            candle_core::bail!("gz-transpose: {batch}×{rows}×{cols} exceeds the kernel's grid");
        };
        let src = slice.slice(a..b);
        // SAFETY: the kernel writes every one of the b - a values (each (image, row, column)
        // lies in one tile of the grid, and the blocks loop over all images).
        let dst = unsafe { dev.alloc::<T>(b - a) }?;
        let func = dev.get_or_load_custom_func(&format!("gz_transpose_{sfx}"), "gz_layout", PTX)?;
        let cfg = LaunchConfig {
            grid_dim,
            block_dim,
            shared_mem_bytes: 0,
        };
        let (batch, rows, cols) = (batch as u32, rows as u32, cols as u32);
        let mut builder = func.builder();
        builder.arg(&src).arg(&dst).arg(&batch).arg(&rows).arg(&cols);
        // SAFETY: argument types and count match `gz_transpose_b32/b16` in layout.cu (const
        // u32/u16*, u32/u16*, u32 batch, u32 rows, u32 cols; T is 4 bytes for b32, 2 for b16);
        // src and dst hold batch·rows·cols values.
        unsafe { builder.launch(cfg) }
            .map_err(|e| candle_core::Error::Cuda(format!("gz-transpose launch: {e:?}").into()))?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }
}

#[cfg(test)]
mod emu_tests;
