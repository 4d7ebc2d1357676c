//! What a launch of `src/kernels/optim.cu` passes: the table of tensors (counts, block ranges,
//! buffer addresses), the scalar arguments and the grid, as plain values shared by the CUDA
//! launcher (`optim/fused.rs`, with the `cudnn` feature) and the emulator tests
//! (`optim/emu_tests.rs`, which run the kernels on the CPU).

use super::{OptimParams, OptimizerKind};

/// Threads per block.
const THREADS: u32 = 256;
/// Most blocks one tensor gets: the kernels loop grid-stride over each tensor, and 1,024 blocks
/// of 256 threads already fill an H200 (132 SMs × 2,048 threads).
const MAX_BLOCKS_PER_TENSOR: u64 = 1024;
/// Most tensors one launch updates (`GZ_OPTIM_MAX_TENSORS` in optim.cu: the table's size).
pub(crate) const MAX_TENSORS: usize = 32;

/// `struct OptimTable` of optim.cu, passed by value as each kernel's first argument: per tensor
/// its element count, its first block, and its buffers' device addresses (0 for an absent
/// buffer: AdamW's second slot elsewhere, the model copy of an f32 model).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Table {
    pub(crate) count: u32,
    pub(crate) block_start: [u32; MAX_TENSORS + 1],
    pub(crate) n: [u64; MAX_TENSORS],
    pub(crate) grad: [u64; MAX_TENSORS],
    pub(crate) slot0: [u64; MAX_TENSORS],
    pub(crate) slot1: [u64; MAX_TENSORS],
    pub(crate) param: [u64; MAX_TENSORS],
    pub(crate) model: [u64; MAX_TENSORS],
}

// The kernel reads the table with the C layout: 4 + 33 × 4 = 136 bytes, then 6 × 32 addresses
// (optim.cu asserts the same offsets).
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<Table>() == 1672);
    assert!(offset_of!(Table, block_start) == 4);
    assert!(offset_of!(Table, n) == 136);
    assert!(offset_of!(Table, grad) == 392);
    assert!(offset_of!(Table, slot0) == 648);
    assert!(offset_of!(Table, slot1) == 904);
    assert!(offset_of!(Table, param) == 1160);
    assert!(offset_of!(Table, model) == 1416);
};

/// One launch: which tensors (a range of the caller's list), the table with their counts and
/// block ranges (addresses still 0: the caller fills them in), and the (grid, block) to launch.
#[derive(Clone, Debug)]
pub(crate) struct Group {
    pub(crate) tensors: std::ops::Range<usize>,
    pub(crate) table: Table,
    pub(crate) grid: ((u32, u32, u32), (u32, u32, u32)),
}

/// Splits tensors of `ns` elements (in order, none empty) into launches of at most
/// `per_launch` tensors (clamped to 1..=[`MAX_TENSORS`]); each tensor gets ⌈n / 256⌉ blocks, at
/// most 1,024 (`blocks_cap` lowers that, for tests that want the stride loops to step).
pub(crate) fn groups(ns: &[u64], per_launch: usize, blocks_cap: Option<u64>) -> Vec<Group> {
    let per = per_launch.clamp(1, MAX_TENSORS);
    let cap = blocks_cap
        .unwrap_or(MAX_BLOCKS_PER_TENSOR)
        .clamp(1, MAX_BLOCKS_PER_TENSOR);
    let mut out = Vec::new();
    let mut first = 0;
    for chunk in ns.chunks(per) {
        let mut table = Table {
            count: chunk.len() as u32,
            block_start: [0; MAX_TENSORS + 1],
            n: [0; MAX_TENSORS],
            grad: [0; MAX_TENSORS],
            slot0: [0; MAX_TENSORS],
            slot1: [0; MAX_TENSORS],
            param: [0; MAX_TENSORS],
            model: [0; MAX_TENSORS],
        };
        let mut blocks = 0u32;
        for (k, &n) in chunk.iter().enumerate() {
            debug_assert!(n > 0, "empty tensors are not launched");
            table.n[k] = n;
            table.block_start[k] = blocks;
            blocks += n.div_ceil(u64::from(THREADS)).clamp(1, cap) as u32;
        }
        table.block_start[chunk.len()] = blocks;
        out.push(Group {
            tensors: first..first + chunk.len(),
            table,
            grid: ((blocks, 1, 1), (THREADS, 1, 1)),
        });
        first += chunk.len();
    }
    out
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
