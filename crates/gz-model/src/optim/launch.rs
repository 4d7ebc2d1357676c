//! What a launch of `src/kernels/optim.cu` passes besides the buffers: the scalar arguments and
//! the grid, as plain values shared by the CUDA launcher ([`super::fused`], with the `cudnn`
//! feature) and the emulator tests (`optim/emu_tests.rs`, which run the kernels on the CPU).

use super::{OptimParams, OptimizerKind};

/// Threads per block.
const THREADS: u32 = 256;
/// Grid cap: the kernels loop grid-stride, so large tensors need no more blocks than this.
const MAX_BLOCKS: u64 = 8192;

/// (grid, block) of an update of `n` values.
pub(super) fn grid(n: u64) -> ((u32, u32, u32), (u32, u32, u32)) {
    let blocks = n.div_ceil(u64::from(THREADS)).clamp(1, MAX_BLOCKS) as u32;
    ((blocks, 1, 1), (THREADS, 1, 1))
}

/// The kernel's scalar arguments, computed on the host exactly as candle's `affine` would cast
/// them (f64 arithmetic, then `as f32`).
#[derive(Debug, Clone, Copy)]
pub(super) enum Scalars {
    Rmsprop {
        use_l2: i32,
        l2: f32,
        rho: f32,
        one_minus_rho: f32,
        eps: f32,
        lr: f32,
    },
    SgdNesterov {
        use_l2: i32,
        l2: f32,
        momentum: f32,
        lr: f32,
    },
    Adamw {
        beta1: f32,
        one_minus_beta1: f32,
        beta2: f32,
        one_minus_beta2: f32,
        inv_bc1: f32,
        inv_bc2: f32,
        decay: f32,
        eps: f32,
        lr: f32,
    },
}

impl Scalars {
    pub(super) fn new(kind: OptimizerKind, hp: &OptimParams, lr: f64, steps: u64) -> Self {
        let use_l2 = i32::from(hp.weight_decay > 0.0);
        match kind {
            OptimizerKind::Rmsprop => Self::Rmsprop {
                use_l2,
                l2: hp.weight_decay as f32,
                rho: hp.rho as f32,
                one_minus_rho: (1.0 - hp.rho) as f32,
                eps: hp.eps as f32,
                lr: lr as f32,
            },
            OptimizerKind::SgdNesterov => Self::SgdNesterov {
                use_l2,
                l2: hp.weight_decay as f32,
                momentum: hp.momentum as f32,
                lr: lr as f32,
            },
            OptimizerKind::Adamw => {
                // As the generic path: `m / (1 - b1^t)` is candle's affine(1 / (1 - b1^t), 0).
                let t = steps as i32;
                Self::Adamw {
                    beta1: hp.beta1 as f32,
                    one_minus_beta1: (1.0 - hp.beta1) as f32,
                    beta2: hp.beta2 as f32,
                    one_minus_beta2: (1.0 - hp.beta2) as f32,
                    inv_bc1: (1.0 / (1.0 - hp.beta1.powi(t))) as f32,
                    inv_bc2: (1.0 / (1.0 - hp.beta2.powi(t))) as f32,
                    decay: (1.0 - lr * hp.weight_decay) as f32,
                    eps: hp.eps as f32,
                    lr: lr as f32,
                }
            }
        }
    }

    pub(super) fn kernel(&self) -> &'static str {
        match self {
            Self::Rmsprop { .. } => "gz_rmsprop",
            Self::SgdNesterov { .. } => "gz_sgd_nesterov",
            Self::Adamw { .. } => "gz_adamw",
        }
    }

    pub(super) fn slots(&self) -> usize {
        match self {
            Self::Rmsprop { .. } | Self::SgdNesterov { .. } => 1,
            Self::Adamw { .. } => 2,
        }
    }
}
