//! Affine resampling of image batches on their own device: real-time augmentation for the
//! trainer, the fixed rotations of test-time augmentation (gz-eval), and the views of
//! Dieleman's net ([`crate::nets::dieleman`]).
//!
//! An [`Affine`] is a 2×3 matrix in normalised coordinates (x right, y down, both in [-1, 1]
//! across the image, pixel centres at `(2j+1)/W - 1` as PyTorch's `align_corners=False`). It maps
//! a point of the *output* image to the point of the *input* image that is sampled there, so the
//! constructors describe what happens to the image content and store the inverse. All
//! constructors keep the image centre fixed except [`Affine::shift`].
//!
//! [`affine_sample`] is bilinear resampling; points outside the input read zero. It runs
//! wherever the batch lives: one kernel on the CUDA fast path (`kernels/affine.cu`), its Rust
//! twin on the CPU (`cpu`), and everywhere else (or switched off) candle tensor ops (a batched
//! matmul for the sampling grid, `floor`, and a `gather` of the four neighbours from the
//! flattened images), the reference both are tested against. It is meant for inputs (no
//! gradient is needed or tested through it). [`random_augment`] draws one
//! affine per image (rotation 0–360°, flip, log-uniform zoom in [1/1.3, 1.3], shifts of a few
//! pixels, as Dieleman et al. 2015 section 4) plus brightness and per-channel colour gains, all
//! from the caller's seeded RNG.

use candle_core::{DType, Result, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// A 2×3 affine map from output to input coordinates (normalised, see the module doc):
/// `x_in = m[0][0]·x + m[0][1]·y + m[0][2]`, `y_in = m[1][0]·x + m[1][1]·y + m[1][2]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    /// Row-major 2×3 matrix.
    pub m: [[f32; 3]; 2],
}

impl Default for Affine {
    fn default() -> Self {
        Self::identity()
    }
}

impl Affine {
    /// Samples each output point at the same input point.
    pub fn identity() -> Self {
        Affine {
            m: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
        }
    }

    /// Rotates the content counter-clockwise (as displayed, y down) by `deg` degrees about
    /// the centre.
    pub fn rotation(deg: f32) -> Self {
        let t = (deg as f64).to_radians();
        let (s, c) = (t.sin() as f32, t.cos() as f32);
        // output q = R_ccw(θ) p  ⇒  p = [[c, -s], [s, c]] q
        Affine {
            m: [[c, -s, 0.0], [s, c, 0.0]],
        }
    }

    /// Mirrors the content left-right.
    pub fn flip_horizontal() -> Self {
        Affine {
            m: [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
        }
    }

    /// Zooms the content by `zoom` about the centre (> 1 magnifies: the output shows the
    /// central 1/zoom of the input).
    pub fn scale(zoom: f32) -> Self {
        let z = 1.0 / zoom;
        Affine {
            m: [[z, 0.0, 0.0], [0.0, z, 0.0]],
        }
    }

    /// Moves the content by `(dx, dy)` in normalised units (2/W per pixel).
    pub fn shift(dx: f32, dy: f32) -> Self {
        Affine {
            m: [[1.0, 0.0, -dx], [0.0, 1.0, -dy]],
        }
    }

    /// Moves the content by `(dx, dy)` pixels of a `w`×`h` image.
    pub fn shift_pixels(dx: f32, dy: f32, w: usize, h: usize) -> Self {
        Self::shift(2.0 * dx / w.max(1) as f32, 2.0 * dy / h.max(1) as f32)
    }

    /// The content transform of `self` followed by that of `next`.
    pub fn then(&self, next: &Affine) -> Affine {
        // sampling: output q → M_next q (a point of the image after `self`) → M_self (M_next q)
        let a = &self.m;
        let b = &next.m;
        let mut m = [[0f32; 3]; 2];
        for (r, row) in m.iter_mut().enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = a[r][0] * b[0][c] + a[r][1] * b[1][c] + if c == 2 { a[r][2] } else { 0.0 };
            }
        }
        Affine { m }
    }

    /// Content: mirror (if `flip`), rotate by `deg`, zoom by `zoom`, then shift by `(dx, dy)`
    /// normalised units.
    pub fn rotation_flip_scale_shift(deg: f32, flip: bool, zoom: f32, dx: f32, dy: f32) -> Affine {
        let base = if flip {
            Affine::flip_horizontal()
        } else {
            Affine::identity()
        };
        base.then(&Affine::rotation(deg))
            .then(&Affine::scale(zoom))
            .then(&Affine::shift(dx, dy))
    }
}

/// Bilinearly resamples image `b` of `images` (B, C, H, W) through `mats[b]` into an
/// (B, C, out_h, out_w) tensor of the same dtype on the same device; points outside the input
/// read 0. The arithmetic is f32.
///
/// On CUDA with the fast path ([`crate::cudnn::active_for`]) this is one kernel
/// (`src/kernels/affine.cu`), on the CPU its Rust twin (both switchable, see
/// [`set_resample_kernels`] and [`set_resample_cpu`]); elsewhere the candle-ops implementation
/// below, which is also the reference both are tested against.
pub fn affine_sample(images: &Tensor, mats: &[Affine], out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, _, h, w) = images.dims4()?;
    if mats.len() != b {
        candle_core::bail!("affine_sample: {} matrices for a batch of {b} images", mats.len());
    }
    if out_h == 0 || out_w == 0 || h == 0 || w == 0 {
        candle_core::bail!("affine_sample: empty image ({h}×{w} → {out_h}×{out_w})");
    }
    if kernel_path(images) {
        return images.contiguous()?.apply_op1_no_bwd(&kernels::Resample::Affine {
            mats: mats.to_vec(),
            out_h,
            out_w,
        });
    }
    affine_sample_ops(images, mats, out_h, out_w)
}

/// On by default since the 2026-11-30 device run checked the kernels on an H200.
static KERNELS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Lets [`affine_sample`] and [`dieleman_parts_kernel`] use the CUDA kernels on the fast path
/// (the default) or not; `gz` reads `GZ_RESAMPLE=kernel|ops`.
pub fn set_resample_kernels(on: bool) {
    KERNELS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_resample_kernels`] allows the CUDA resampling kernels.
pub fn resample_kernels_enabled() -> bool {
    KERNELS.load(std::sync::atomic::Ordering::Relaxed)
}

/// On by default: the CPU twin of the kernels (`cpu`), checked against the candle ops.
static CPU_TWIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Lets [`affine_sample`] and [`dieleman_parts_kernel`] run the kernels' Rust twin for CPU
/// images (on by default; `gz` reads `GZ_RESAMPLE=ops` to switch it off with the kernels).
pub fn set_resample_cpu(on: bool) {
    CPU_TWIN.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the resampling op (CUDA kernels or their CPU twin) serves `images`: a float dtype
/// they have, and either the CUDA fast path with the kernels switched on and indices that fit
/// 32 bits, or the CPU with the twin switched on.
fn kernel_path(images: &Tensor) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    matches!(images.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && if images.device().is_cpu() {
            CPU_TWIN.load(Relaxed)
        } else {
            KERNELS.load(Relaxed) && crate::cudnn::active_for(images.device()) && images.elem_count() < (1 << 31)
        }
}

/// Dieleman's 16 parts per galaxy straight from the images, `(B, C, H, W)` →
/// `(16·B, C, 45, 45)`: the same values, in the same order, as cutting [`affine_sample`]'s four
/// 69×69 views (`mats`, one per view) into their four rotated corners (kernel switched on with
/// [`set_resample_kernels`])
/// ([`crate::nets::dieleman::parts`]). One kernel on the CUDA fast path, one pass of its Rust
/// twin on the CPU ([`set_resample_cpu`]); elsewhere `None` (the caller composes views and
/// parts with candle ops).
pub fn dieleman_parts_kernel(images: &Tensor, mats: [Affine; 4]) -> Result<Option<Tensor>> {
    let (view, part) = (crate::config::DIELEMAN_VIEW, crate::config::DIELEMAN_PART);
    let b = images.dim(0)?;
    if !kernel_path(images) || 16 * b * images.dim(1)? * part * part >= (1 << 31) {
        return Ok(None);
    }
    Ok(Some(images.contiguous()?.apply_op1_no_bwd(
        &kernels::Resample::DielemanParts { mats, view, part },
    )?))
}

/// The candle-ops implementation of [`affine_sample`] (any device).
fn affine_sample_ops(images: &Tensor, mats: &[Affine], out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    let dev = images.device();
    let dtype = images.dtype();
    let n = out_h * out_w;

    // base grid (3, N): rows x, y, 1 of each output pixel centre
    let mut base = Vec::with_capacity(3 * n);
    base.extend((0..n).map(|k| (2 * (k % out_w) + 1) as f32 / out_w as f32 - 1.0));
    base.extend((0..n).map(|k| (2 * (k / out_w) + 1) as f32 / out_h as f32 - 1.0));
    base.extend(std::iter::repeat_n(1f32, n));
    let base = Tensor::from_vec(base, (3, n), dev)?;
    let m: Vec<f32> = mats.iter().flat_map(|a| a.m.iter().flatten().copied()).collect();
    let m = Tensor::from_vec(m, (b, 2, 3), dev)?;
    let coords = m.broadcast_matmul(&base)?; // (B, 2, N)
                                             // input pixel coordinates: p = (x + 1) W / 2 - 1/2
    let px = coords
        .narrow(1, 0, 1)?
        .squeeze(1)?
        .affine(w as f64 / 2.0, (w as f64 - 1.0) / 2.0)?;
    let py = coords
        .narrow(1, 1, 1)?
        .squeeze(1)?
        .affine(h as f64 / 2.0, (h as f64 - 1.0) / 2.0)?;
    let x0 = px.floor()?;
    let y0 = py.floor()?;
    let fx = (&px - &x0)?;
    let fy = (&py - &y0)?;
    let x1 = (&x0 + 1.0)?;
    let y1 = (&y0 + 1.0)?;
    let gx = fx.affine(-1.0, 1.0)?;
    let gy = fy.affine(-1.0, 1.0)?;

    let flat = images.to_dtype(DType::F32)?.reshape((b, c, h * w))?;
    let (wm, hm) = ((w - 1) as f64, (h - 1) as f64);
    let inside = |t: &Tensor, max: f64| -> Result<Tensor> {
        t.ge(0.0)?.to_dtype(DType::F32)?.mul(&t.le(max)?.to_dtype(DType::F32)?)
    };
    let vx0 = inside(&x0, wm)?;
    let vx1 = inside(&x1, wm)?;
    let vy0 = inside(&y0, hm)?;
    let vy1 = inside(&y1, hm)?;
    let cx0 = x0.clamp(0.0, wm)?;
    let cx1 = x1.clamp(0.0, wm)?;
    let cy0 = y0.clamp(0.0, hm)?;
    let cy1 = y1.clamp(0.0, hm)?;

    let corners = [
        (&cx0, &cy0, (&gx * &gy)?, (&vx0 * &vy0)?),
        (&cx1, &cy0, (&fx * &gy)?, (&vx1 * &vy0)?),
        (&cx0, &cy1, (&gx * &fy)?, (&vx0 * &vy1)?),
        (&cx1, &cy1, (&fx * &fy)?, (&vx1 * &vy1)?),
    ];
    let mut out: Option<Tensor> = None;
    for (cx, cy, wt, valid) in corners {
        let idx = cy.affine(w as f64, 0.0)?.add(cx)?.to_dtype(DType::U32)?; // (B, N)
        let idx = idx.unsqueeze(1)?.broadcast_as((b, c, n))?.contiguous()?;
        let vals = flat.gather(&idx, 2)?; // (B, C, N)
        let wt = wt.mul(&valid)?.unsqueeze(1)?;
        let term = vals.broadcast_mul(&wt)?;
        out = Some(match out {
            None => term,
            Some(o) => (o + term)?,
        });
    }
    let out = out.ok_or_else(|| candle_core::Error::Msg("affine_sample: no corners".into()))?;
    out.reshape((b, c, out_h, out_w))?.to_dtype(dtype)
}

/// Real-time augmentation settings (serde; part of the trainer's config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Master switch; `false` makes [`random_augment`] the identity.
    pub enabled: bool,
    /// Rotation drawn uniformly in [0, max_rotation_deg) (360: any orientation).
    pub max_rotation_deg: f32,
    /// Mirror left-right with probability 1/2 (with full rotations this covers every flip).
    pub flip: bool,
    /// Zoom drawn log-uniformly in [1/max_zoom, max_zoom] (1: none).
    pub max_zoom: f32,
    /// Shift drawn uniformly in [-max_shift_px, max_shift_px] pixels on each axis.
    pub max_shift_px: f32,
    /// Brightness gain drawn uniformly in [1 - brightness, 1 + brightness], per image.
    pub brightness: f32,
    /// Extra per-channel colour gain drawn uniformly in [1 - colour, 1 + colour].
    pub colour: f32,
}

impl Default for AugmentConfig {
    /// Dieleman et al.'s recipe plus a mild brightness/colour jitter.
    fn default() -> Self {
        AugmentConfig {
            enabled: true,
            max_rotation_deg: 360.0,
            flip: true,
            max_zoom: 1.3,
            max_shift_px: 4.0,
            brightness: 0.1,
            colour: 0.05,
        }
    }
}

impl AugmentConfig {
    /// No augmentation.
    pub fn none() -> Self {
        AugmentConfig {
            enabled: false,
            ..Self::default()
        }
    }

    /// True when [`random_augment`] would change anything.
    pub fn is_active(&self) -> bool {
        self.enabled
            && (self.max_rotation_deg > 0.0
                || self.flip
                || self.max_zoom > 1.0
                || self.max_shift_px > 0.0
                || self.brightness > 0.0
                || self.colour > 0.0)
    }

    /// Draws one random affine for a `w`×`h` image.
    pub fn random_affine(&self, w: usize, h: usize, rng: &mut impl Rng) -> Affine {
        let deg = if self.max_rotation_deg > 0.0 {
            rng.gen::<f32>() * self.max_rotation_deg
        } else {
            0.0
        };
        let flip = self.flip && rng.gen::<bool>();
        let zoom = if self.max_zoom > 1.0 {
            let l = self.max_zoom.ln();
            (rng.gen::<f32>() * 2.0 * l - l).exp()
        } else {
            1.0
        };
        let (dx, dy) = if self.max_shift_px > 0.0 {
            let s = self.max_shift_px;
            ((rng.gen::<f32>() * 2.0 - 1.0) * s, (rng.gen::<f32>() * 2.0 - 1.0) * s)
        } else {
            (0.0, 0.0)
        };
        Affine::rotation_flip_scale_shift(deg, flip, zoom, 2.0 * dx / w.max(1) as f32, 2.0 * dy / h.max(1) as f32)
    }

    /// Draws the colour gains of one image with `c` channels.
    pub fn random_gains(&self, c: usize, rng: &mut impl Rng) -> Vec<f32> {
        let b = 1.0 + self.brightness * (rng.gen::<f32>() * 2.0 - 1.0);
        (0..c)
            .map(|_| b * (1.0 + self.colour * (rng.gen::<f32>() * 2.0 - 1.0)))
            .collect()
    }
}

/// Applies one random affine and one set of colour gains per image (from `rng`), keeping the
/// batch's shape, dtype and device; values are clamped to [0, 1] afterwards.
pub fn random_augment(images: &Tensor, cfg: &AugmentConfig, rng: &mut impl Rng) -> Result<Tensor> {
    if !cfg.is_active() {
        return Ok(images.clone());
    }
    let (b, c, h, w) = images.dims4()?;
    let mut mats = Vec::with_capacity(b);
    let mut gains = Vec::with_capacity(b * c);
    for _ in 0..b {
        mats.push(cfg.random_affine(w, h, rng));
        gains.extend(cfg.random_gains(c, rng));
    }
    let out = affine_sample(images, &mats, h, w)?;
    let gains = Tensor::from_vec(gains, (b, c, 1, 1), images.device())?.to_dtype(images.dtype())?;
    out.broadcast_mul(&gains)?.clamp(0.0, 1.0)
}

mod cpu;
#[cfg(test)]
mod emu_tests;

mod kernels {
    //! The resampling kernels as a candle custom op (no gradient: inputs only). The CPU side
    //! runs the kernels' Rust twin (`super::cpu`) on contiguous float storages, and the
    //! candle-ops reference ([`Resample::cpu_reference`]) otherwise, so the op is usable (and
    //! testable) anywhere.

    use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};

    use super::Affine;

    pub(super) enum Resample {
        /// [`super::affine_sample`]: one matrix per image.
        Affine {
            mats: Vec<Affine>,
            out_h: usize,
            out_w: usize,
        },
        /// [`super::dieleman_parts_kernel`]: the four view matrices.
        DielemanParts {
            mats: [Affine; 4],
            view: usize,
            part: usize,
        },
    }

    /// (grid, block) of both kernels: grid-stride over the `total` output values, 256 threads a
    /// block (shared by the CUDA launcher and the emulator tests, `augment/emu_tests.rs`).
    #[cfg_attr(
        not(any(feature = "cudnn", test)),
        allow(dead_code, reason = "used by the CUDA launcher and the emulator tests")
    )]
    pub(super) fn grid(total: u32) -> ((u32, u32, u32), (u32, u32, u32)) {
        let threads = 256u32;
        ((total.div_ceil(threads).clamp(1, 65_535 * 16), 1, 1), (threads, 1, 1))
    }

    impl Resample {
        /// The kernel's matrices (6 floats each, row-major 2×3), its name without the dtype
        /// suffix, and its last two size arguments ((out_h, out_w) or (view, part)).
        #[cfg_attr(
            not(any(feature = "cudnn", test)),
            allow(dead_code, reason = "used by the CUDA launcher and the emulator tests")
        )]
        pub(super) fn kernel_args(&self) -> (Vec<f32>, &'static str, [usize; 2]) {
            match self {
                Resample::Affine { mats, out_h, out_w } => (
                    mats.iter().flat_map(|m| m.m.iter().flatten().copied()).collect(),
                    "affine_sample",
                    [*out_h, *out_w],
                ),
                Resample::DielemanParts { mats, view, part } => (
                    mats.iter().flat_map(|m| m.m.iter().flatten().copied()).collect(),
                    "dieleman_parts",
                    [*view, *part],
                ),
            }
        }

        /// The kernel's values by its Rust twin, from contiguous `x` of `dims` (B, C, H, W).
        fn twin<T: WithDType>(&self, x: &[T], dims: [usize; 4]) -> Vec<T> {
            match self {
                Resample::Affine { mats, out_h, out_w } => super::cpu::affine_sample(x, mats, dims, *out_h, *out_w),
                Resample::DielemanParts { mats, view, part } => super::cpu::dieleman_parts(x, mats, dims, *view, *part),
            }
        }

        /// The op's values by candle ops on `x`'s device: [`super::affine_sample_ops`], and for
        /// the parts the views cut into corners ([`crate::nets::dieleman::parts`]). The
        /// reference the kernels and the twin are tested against.
        pub(super) fn cpu_reference(&self, x: &Tensor) -> Result<Tensor> {
            match self {
                Resample::Affine { mats, out_h, out_w } => super::affine_sample_ops(x, mats, *out_h, *out_w),
                Resample::DielemanParts { mats, view, .. } => {
                    let b = x.dim(0)?;
                    let rep = Tensor::cat(&[x, x, x, x], 0)?;
                    let per_image: Vec<Affine> = mats.iter().flat_map(|m| std::iter::repeat_n(*m, b)).collect();
                    let views = super::affine_sample_ops(&rep, &per_image, *view, *view)?;
                    crate::nets::dieleman::parts(&views)
                }
            }
        }

        pub(super) fn out_shape(&self, l: &Layout) -> Result<Shape> {
            let (b, c, _, _) = l.shape().dims4()?;
            Ok(match self {
                Resample::Affine { out_h, out_w, .. } => Shape::from((b, c, *out_h, *out_w)),
                Resample::DielemanParts { part, .. } => Shape::from((16 * b, c, *part, *part)),
            })
        }
    }

    impl CustomOp1 for Resample {
        fn name(&self) -> &'static str {
            "gz-resample"
        }

        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
            let shape = self.out_shape(l)?;
            let dims: [usize; 4] = l.shape().dims4()?.into();
            // the twin wants a contiguous storage and sides that fit its i32 pixel arithmetic
            let offsets = l
                .contiguous_offsets()
                .filter(|_| dims[2] < 1 << 30 && dims[3] < 1 << 30);
            let out = match (offsets, s) {
                (Some((a, b)), CpuStorage::F32(v)) => CpuStorage::F32(self.twin(&v[a..b], dims)),
                (Some((a, b)), CpuStorage::BF16(v)) => CpuStorage::BF16(self.twin(&v[a..b], dims)),
                (Some((a, b)), CpuStorage::F16(v)) => CpuStorage::F16(self.twin(&v[a..b], dims)),
                _ => return crate::cudnn::cpu_storage(&self.cpu_reference(&crate::cudnn::cpu_tensor(s, l)?)?),
            };
            Ok((out, shape))
        }

        #[allow(unused_variables, reason = "the arguments are only used with the cudnn feature")]
        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let shape = self.out_shape(l)?;
            #[cfg(feature = "cudnn")]
            {
                let out = cuda::launch(self, s, l, shape.elem_count())?;
                Ok((out, shape))
            }
            #[cfg(not(feature = "cudnn"))]
            candle_core::bail!("gz-resample: this build has no CUDA kernels (build gz-model with the `cudnn` feature)")
        }
    }

    #[cfg(feature = "cudnn")]
    mod cuda {
        //! Launches of `src/kernels/affine.cu`.

        use candle_core::backend::BackendStorage;
        use candle_core::cuda::CudaDType;
        use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, WithDType};
        use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

        use super::Resample;

        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/affine.ptx"));

        pub(super) fn launch(op: &Resample, s: &CudaStorage, l: &Layout, total: usize) -> Result<CudaStorage> {
            let dev = s.device().clone();
            match s.dtype() {
                DType::F32 => go::<f32>(&dev, op, s, l, total, "f32"),
                DType::BF16 => go::<half::bf16>(&dev, op, s, l, total, "bf16"),
                DType::F16 => go::<half::f16>(&dev, op, s, l, total, "f16"),
                other => candle_core::bail!("gz-resample supports f32, bf16 and f16, not {other:?}"),
            }
        }

        fn go<T: CudaDType + DeviceRepr + WithDType>(
            dev: &CudaDevice,
            op: &Resample,
            s: &CudaStorage,
            l: &Layout,
            total: usize,
            sfx: &str,
        ) -> Result<CudaStorage> {
            let Some((a, b)) = l.contiguous_offsets() else {
                candle_core::bail!("gz-resample: input is not contiguous");
            };
            let input = s.as_cuda_slice::<T>()?.slice(a..b);
            let (n, c, h, w) = l.shape().dims4()?;
            let u = |v: usize| {
                u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("gz-resample: {v} exceeds 32 bits")))
            };
            // the kernels' grid-stride loops use 32-bit indices that step by up to 2^28
            if total > i32::MAX as usize {
                candle_core::bail!("gz-resample: {total} output values exceed the kernels' 32-bit indexing");
            }
            let total32 = u(total)?;
            let (mats, name, extra) = op.kernel_args();
            let extra = [u(extra[0])?, u(extra[1])?];
            let mats = dev
                .cuda_stream()
                .clone_htod(&mats)
                .map_err(|e| candle_core::Error::Cuda(format!("gz-resample: upload matrices: {e:?}").into()))?;
            // SAFETY: the kernel writes every output element (grid-stride over `total`).
            let out = unsafe { dev.alloc::<T>(total) }?;
            let func = dev.get_or_load_custom_func(&format!("{name}_{sfx}"), "gz_affine", PTX)?;
            let (grid_dim, block_dim) = super::grid(total32);
            let cfg = LaunchConfig {
                grid_dim,
                block_dim,
                shared_mem_bytes: 0,
            };
            let (n32, c32, h32, w32) = (u(n)?, u(c)?, u(h)?, u(w)?);
            let mut builder = func.builder();
            builder
                .arg(&input)
                .arg(&mats)
                .arg(&out)
                .arg(&n32)
                .arg(&c32)
                .arg(&h32)
                .arg(&w32)
                .arg(&extra[0])
                .arg(&extra[1]);
            // SAFETY: argument types and count match `affine_sample_*` / `dieleman_parts_*` in
            // affine.cu; `input` holds n·c·h·w elements, `mats` 6 per matrix the kernel indexes
            // (one per image, or four), `out` the `total` elements of the output shape.
            unsafe { builder.launch(cfg) }
                .map_err(|e| candle_core::Error::Cuda(format!("gz-resample: launch: {e:?}").into()))?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::SeedableRng;

    use crate::testutil::max_abs_diff;

    /// The resampling op's CPU side is the kernels' Rust twin: against the candle-ops reference
    /// on random affines that read outside the image, every float dtype, with the CUDA test's
    /// tolerances; and the public entry points take it for CPU images.
    #[test]
    fn cpu_twin_matches_the_candle_ops() {
        let (b, c, h, w) = (3, 3, 53, 47);
        let x = pattern(b, c, h, w);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let cfg = AugmentConfig {
            max_zoom: 1.6,
            max_shift_px: 12.0,
            ..AugmentConfig::default()
        };
        let mats: Vec<Affine> = (0..b).map(|_| cfg.random_affine(w, h, &mut rng)).collect();
        let affine = kernels::Resample::Affine {
            mats: mats.clone(),
            out_h: 33,
            out_w: 41,
        };
        let vm = crate::nets::dieleman::view_affines(0.8);
        let parts = kernels::Resample::DielemanParts {
            mats: vm,
            view: crate::config::DIELEMAN_VIEW,
            part: crate::config::DIELEMAN_PART,
        };
        for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 1.6e-2), (DType::F16, 2e-3)] {
            let xd = x.to_dtype(dtype).unwrap();
            for (name, op) in [("affine", &affine), ("parts", &parts)] {
                let twin = xd.apply_op1_no_bwd(op).unwrap();
                let reference = op.cpu_reference(&xd).unwrap();
                assert_eq!(twin.dims(), reference.dims(), "{name}");
                assert_eq!(twin.dtype(), dtype);
                let d = max_abs_diff(&twin, &reference);
                assert!(d <= tol, "{dtype:?} {name}: twin and candle ops differ by {d}");
                // a strided input takes the reference path and still gives the op's values
                let t = xd.t().unwrap().contiguous().unwrap().t().unwrap();
                assert!(!t.is_contiguous());
                let d = max_abs_diff(&t.apply_op1_no_bwd(op).unwrap(), &reference);
                assert_eq!(d, 0.0, "{dtype:?} {name}: the strided input takes the reference");
            }
        }
        // the values are not all zero (the affines keep most of the image inside)
        let out = affine_sample(&x, &mats, 33, 41).unwrap();
        assert!(out.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 100.0);
        // the public entry points run the twin on the CPU (the switch is on by default)
        let composed = affine_sample_ops(&x, &mats, 33, 41).unwrap();
        assert_eq!(max_abs_diff(&out, &x.apply_op1_no_bwd(&affine).unwrap()), 0.0);
        assert!(max_abs_diff(&out, &composed) <= 1e-4);
        let fast = dieleman_parts_kernel(&x, vm).unwrap().expect("the CPU twin");
        assert_eq!(max_abs_diff(&fast, &x.apply_op1_no_bwd(&parts).unwrap()), 0.0);
        assert_eq!(
            fast.dims(),
            &[16 * b, c, crate::config::DIELEMAN_PART, crate::config::DIELEMAN_PART]
        );
    }

    /// The resampling figures of `docs/benchmarks.md`: Dieleman's 16 parts of a batch of 8
    /// galaxies at 106 px, and `random_augment`'s resampling of a batch of 16, candle ops
    /// against the twin. Run by hand:
    /// `cargo test --release -p gz-model --lib augment::tests::bench_resample -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark: run by hand with --ignored --nocapture (release)"]
    fn bench_resample() {
        let best = |f: &dyn Fn() -> Tensor| {
            (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    std::hint::black_box(f());
                    t.elapsed().as_secs_f64() * 1e3
                })
                .fold(f64::INFINITY, f64::min)
        };
        let vm = crate::nets::dieleman::view_affines(207.0 / 212.0);
        let x = pattern(8, 3, 106, 106);
        let parts = kernels::Resample::DielemanParts {
            mats: vm,
            view: crate::config::DIELEMAN_VIEW,
            part: crate::config::DIELEMAN_PART,
        };
        let ops = best(&|| parts.cpu_reference(&x).unwrap());
        let twin = best(&|| x.apply_op1_no_bwd(&parts).unwrap());
        println!("dieleman parts, batch 8, 106 px (best of 5): candle ops {ops:.2} ms, twin {twin:.2} ms");
        let x = pattern(16, 3, 106, 106);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mats: Vec<Affine> = (0..16)
            .map(|_| AugmentConfig::default().random_affine(106, 106, &mut rng))
            .collect();
        let affine = kernels::Resample::Affine {
            mats,
            out_h: 106,
            out_w: 106,
        };
        let ops = best(&|| affine.cpu_reference(&x).unwrap());
        let twin = best(&|| x.apply_op1_no_bwd(&affine).unwrap());
        println!("affine resampling, batch 16, 106 px (best of 5): candle ops {ops:.2} ms, twin {twin:.2} ms");
    }

    /// The CUDA kernels against the candle-ops path on the same GPU (run on a GPU machine;
    /// skipped without one): random affines with out-of-image reads, every dtype, and the
    /// Dieleman parts against views + corners.
    #[cfg(feature = "cudnn")]
    #[test]
    fn cuda_resampling_kernels_match_the_ops() {
        let Some(gpu) = crate::testutil::gpu() else { return };
        set_resample_kernels(true);
        let x = pattern(5, 3, 106, 106).to_device(&gpu).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let cfg = AugmentConfig::default();
        let mats: Vec<Affine> = (0..5).map(|_| cfg.random_affine(106, 106, &mut rng)).collect();
        for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 1.6e-2), (DType::F16, 2e-3)] {
            let xd = x.to_dtype(dtype).unwrap();
            let fast = affine_sample(&xd, &mats, 69, 69).unwrap();
            let slow = affine_sample_ops(&xd, &mats, 69, 69).unwrap();
            let d = max_abs_diff(&fast, &slow);
            assert!(d <= tol, "{dtype:?} affine: {d}");
            let vm = crate::nets::dieleman::view_affines(207.0 / 212.0);
            let fast = dieleman_parts_kernel(&xd, vm)
                .unwrap()
                .expect("the kernel path on CUDA");
            let slow =
                crate::nets::dieleman::parts(&crate::nets::dieleman::views(&xd, 207.0 / 212.0).unwrap()).unwrap();
            let d = max_abs_diff(&fast, &slow);
            assert!(d <= tol, "{dtype:?} parts: {d}");
        }
    }

    /// An asymmetric 2×3×H×W test batch: every pixel distinct.
    fn pattern(b: usize, c: usize, h: usize, w: usize) -> Tensor {
        let v: Vec<f32> = (0..b * c * h * w)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect();
        Tensor::from_vec(v, (b, c, h, w), &Device::Cpu).unwrap()
    }

    #[test]
    fn identity_reproduces_input() {
        let x = pattern(2, 3, 11, 13);
        let y = affine_sample(&x, &[Affine::identity(); 2], 11, 13).unwrap();
        assert!(max_abs_diff(&x, &y) < 1e-5);
    }

    #[test]
    fn rotation_90_is_transpose_and_flip() {
        let x = pattern(2, 3, 9, 9);
        let y = affine_sample(&x, &[Affine::rotation(90.0); 2], 9, 9).unwrap();
        // out[i][j] = in[j][W-1-i]
        let want = x.transpose(2, 3).unwrap().contiguous().unwrap().flip(&[2]).unwrap();
        assert!(max_abs_diff(&want, &y) < 1e-5);
        // and four quarter turns are the identity
        let r = Affine::rotation(90.0);
        let full = r.then(&r).then(&r).then(&r);
        let z = affine_sample(&x, &[full; 2], 9, 9).unwrap();
        assert!(max_abs_diff(&x, &z) < 1e-4);
    }

    #[test]
    fn rotation_is_counter_clockwise_as_displayed() {
        // a bright pixel right of the centre moves to above the centre under +90°
        let mut v = vec![0f32; 9 * 9];
        v[4 * 9 + 7] = 1.0; // row 4 (centre), column 7 (right)
        let x = Tensor::from_vec(v, (1, 1, 9, 9), &Device::Cpu).unwrap();
        let y = affine_sample(&x, &[Affine::rotation(90.0)], 9, 9).unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((y[9 + 4] - 1.0).abs() < 1e-5, "expected at row 1, column 4");
    }

    #[test]
    fn horizontal_flip_matches_flip() {
        let x = pattern(2, 3, 8, 10);
        let y = affine_sample(&x, &[Affine::flip_horizontal(); 2], 8, 10).unwrap();
        assert!(max_abs_diff(&x.flip(&[3]).unwrap(), &y) < 1e-5);
    }

    #[test]
    fn per_image_matrices_and_zero_outside() {
        let x = pattern(2, 1, 8, 8);
        // image 0 unchanged, image 1 shifted right by 2 pixels: left two columns read zero
        let y = affine_sample(&x, &[Affine::identity(), Affine::shift_pixels(2.0, 0.0, 8, 8)], 8, 8).unwrap();
        assert!(max_abs_diff(&x.narrow(0, 0, 1).unwrap(), &y.narrow(0, 0, 1).unwrap()) < 1e-5);
        let y1 = y.narrow(0, 1, 1).unwrap();
        assert_eq!(
            y1.narrow(3, 0, 2)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let want = x.narrow(0, 1, 1).unwrap().narrow(3, 0, 6).unwrap();
        assert!(max_abs_diff(&want, &y1.narrow(3, 2, 6).unwrap()) < 1e-5);
        // zooming out by 2 keeps the centre and blanks the border
        let z = affine_sample(&x, &[Affine::scale(0.5); 2], 8, 8).unwrap();
        assert_eq!(
            z.narrow(2, 0, 1)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        assert!(affine_sample(&x, &[Affine::identity()], 8, 8).is_err());
    }

    #[test]
    fn random_augment_is_seeded_and_in_range() {
        let x = pattern(4, 3, 16, 16);
        let cfg = AugmentConfig::default();
        let a = random_augment(&x, &cfg, &mut rand_chacha::ChaCha8Rng::seed_from_u64(3)).unwrap();
        let b = random_augment(&x, &cfg, &mut rand_chacha::ChaCha8Rng::seed_from_u64(3)).unwrap();
        let c = random_augment(&x, &cfg, &mut rand_chacha::ChaCha8Rng::seed_from_u64(4)).unwrap();
        assert_eq!(a.dims(), x.dims());
        assert_eq!(max_abs_diff(&a, &b), 0.0);
        assert!(max_abs_diff(&a, &c) > 1e-3);
        let v = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|p| (0.0..=1.0).contains(p)));
        let off = random_augment(
            &x,
            &AugmentConfig::none(),
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(3),
        )
        .unwrap();
        assert_eq!(max_abs_diff(&off, &x), 0.0);
        let json = serde_json::to_string(&cfg).unwrap();
        assert_eq!(serde_json::from_str::<AugmentConfig>(&json).unwrap(), cfg);
    }
}
