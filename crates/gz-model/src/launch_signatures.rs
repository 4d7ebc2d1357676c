//! The Rust half of every CUDA launch, pinned against the kernels' parameter lists, on the CPU.
//!
//! The emulator tests (`src/**/emu_tests.rs`) run the kernels with their own argument lists;
//! what they cannot see is the argument list each CUDA launcher pushes with cudarc's
//! `.arg(..)`, which the driver takes as raw bytes: one argument too many or too few, two
//! swapped, a `usize` where the kernel takes a `uint32_t` or an `f64` for a `float` all compile,
//! and garble the launch on a GPU. This test parses `src/kernels/*.cu` (the `extern "C"
//! __global__` definitions, the instantiation macros expanded) and checks [`LAUNCHES`], one
//! entry per kernel family the launchers load: the kernel exists in the file whose PTX the
//! launcher embeds, for every dtype suffix it loads, with the entry's parameter kinds. Each
//! entry also pins the launcher's source (whitespace-insensitive): its `.arg` chain in order
//! and the lines that give those arguments their Rust types and pick the kernel name, so
//! changing a launch or a kernel signature fails here until the entry is updated (and
//! re-checked). Every kernel in the `.cu` files must have an entry, and every `.arg(` in a
//! launcher file must belong to one.
//!
//! No CUDA needed: it reads the sources only (a test module of the library, so that the
//! workspace keeps one integration-test binary).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// A parameter, as the launcher's entry states it.
#[derive(Clone, Copy, Debug)]
enum A {
    /// A pointer to the storage type of the dtype suffix (f32 → float, bf16 → __nv_bfloat16,
    /// f16 → __half, f64 → double, b32 → uint32_t, b16 → uint16_t).
    P,
    /// A pointer to float whatever the suffix.
    PF32,
    /// A pointer to bytes (`uint8_t`) whatever the suffix.
    PU8,
    U32,
    U64,
    I32,
    F32,
    /// A scalar of the storage type of the suffix (float for f32, double for f64).
    E,
    /// A struct by value.
    S(&'static str),
}

/// A launcher file: the `.cu` whose PTX it embeds and its module name (the key candle caches the
/// loaded module under: distinct per PTX).
struct File {
    rs: &'static str,
    cu: &'static str,
    module: &'static str,
}

const FILES: &[File] = &[
    File {
        rs: "cudnn/fused.rs",
        cu: "bias_relu.cu",
        module: "gz_bias_relu",
    },
    File {
        rs: "cudnn/layout.rs",
        cu: "layout.cu",
        module: "gz_layout",
    },
    File {
        rs: "cudnn/im2col.rs",
        cu: "im2col.cu",
        module: "gz_im2col",
    },
    File {
        rs: "dropout.rs",
        cu: "dropout.cu",
        module: "gz_dropout",
    },
    File {
        rs: "tree.rs",
        cu: "tree.cu",
        module: "gz_tree",
    },
    File {
        rs: "augment.rs",
        cu: "affine.cu",
        module: "gz_affine",
    },
    File {
        rs: "optim/fused.rs",
        cu: "optim.cu",
        module: "gz_optim",
    },
];

/// One kernel family as its launcher calls it.
struct Launch {
    /// The launcher file (one of [`FILES`]).
    rs: &'static str,
    /// Kernel names without the dtype suffix.
    kernels: &'static [&'static str],
    /// The suffixes the launcher loads (`{kernel}_{suffix}`).
    suffixes: &'static [&'static str],
    /// The kernel's parameters in order.
    params: &'static [A],
    /// The argument pushes in `rs`, in order: `.arg` chains, `for` loops over a slice of
    /// arguments (not counted here), and the `&[..]` slice such a loop pushes (one argument
    /// per element). Together they push `params.len()` arguments.
    chains: &'static [&'static str],
    /// Further lines that must stay as they are: (file under src/, text). The arguments' Rust
    /// types and the dtype → suffix choice.
    evidence: &'static [(&'static str, &'static str)],
}

const FLOATS: &[&str] = &["f32", "bf16", "f16"];

/// Lines more than one entry relies on. bias_relu.cu's launchers: the dtype picks the suffix
/// through `suffix(T::DTYPE)`, the buffers are `CudaView<T>`s of the inputs and `CudaSlice<T>`s
/// allocated for T; the backward kernels' shared launch (`packed_backward`) pushes its `dims`
/// (u32) after the four buffers, `partial` f32.
const COMMON: &[(&str, &str)] = &[
    (
        "cudnn/fused.rs",
        r#"DType::F32 => "f32", DType::BF16 => "bf16", DType::F16 => "f16","#,
    ),
    (
        "cudnn/fused.rs",
        "fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>>",
    ),
    (
        "cudnn/fused.rs",
        "fn geometry(l: &Layout) -> Result<(u32, u32, u32, u32)>",
    ),
    ("cudnn/fused.rs", "fn u32_of(v: usize, what: &str) -> Result<u32>"),
    (
        "cudnn/fused.rs",
        "DType::BF16 => fwd::<half::bf16>(&dev, z, lz, b, lb),",
    ),
    (
        "cudnn/fused.rs",
        "DType::F16 if nhwc => fwd_nhwc::<half::f16>(&dev, z, lz, b, lb),",
    ),
    ("cudnn/fused.rs", "dims: &[u32],"),
    (
        "cudnn/fused.rs",
        "let partial = unsafe { dev.alloc::<f32>(k as usize * splits as usize) }?;",
    ),
    ("cudnn/fused.rs", "let sfx = suffix(T::DTYPE)?;"),
    ("cudnn/fused.rs", r#"format!("{name}_{sfx}")"#),
];

/// The backward kernels' shared launch (`packed_backward`): four buffers, then `dims`.
const PACKED_PREFIX: &[&str] = &[
    "launch.arg(y).arg(g).arg(&mut dz).arg(&partial);",
    "for d in dims { launch.arg(d); }",
];

const LAUNCHES: &[Launch] = &[
    // ---- bias_relu.cu
    Launch {
        rs: "cudnn/fused.rs",
        kernels: &["bias_relu_fwd_flat"],
        suffixes: FLOATS,
        params: &[A::P, A::P, A::P, A::U32, A::U32, A::U32],
        chains: &["launch.arg(&zs).arg(&bs).arg(&y).arg(&total32).arg(&k).arg(&hw);"],
        evidence: &[
            (
                "cudnn/fused.rs",
                r#"format!("bias_relu_fwd_flat_{}", suffix(T::DTYPE)?)"#,
            ),
            ("cudnn/fused.rs", "let (_, k, hw, planes) = geometry(lz)?;"),
            ("cudnn/fused.rs", r#"let total32 = u32_of(total, "size")?;"#),
        ],
    },
    Launch {
        rs: "cudnn/fused.rs",
        kernels: &["bias_relu_fwd"],
        suffixes: FLOATS,
        params: &[A::P, A::P, A::P, A::U32, A::U32],
        chains: &["launch.arg(&zs).arg(&bs).arg(&y).arg(&k).arg(&hw);"],
        evidence: &[("cudnn/fused.rs", r#"format!("bias_relu_fwd_{}", suffix(T::DTYPE)?)"#)],
    },
    Launch {
        rs: "cudnn/fused.rs",
        kernels: &["bias_relu_pool_fwd", "bias_relu_pool_fwd_nhwc"],
        suffixes: FLOATS,
        params: &[A::P, A::P, A::P, A::P, A::U32, A::U32, A::U32, A::U32],
        chains: &["launch.arg(&zs).arg(&bs).arg(&y).arg(&p).arg(&n).arg(&k).arg(&h).arg(&w);"],
        evidence: &[
            ("cudnn/fused.rs", "(n, k, h, w): (u32, u32, u32, u32), nhwc: bool,"),
            (
                "cudnn/fused.rs",
                r#"format!("bias_relu_pool_fwd_nhwc_{}", suffix(T::DTYPE)?)"#,
            ),
            (
                "cudnn/fused.rs",
                r#"format!("bias_relu_pool_fwd_{}", suffix(T::DTYPE)?)"#,
            ),
        ],
    },
    Launch {
        rs: "cudnn/fused.rs",
        kernels: &["bias_relu_fwd_nhwc"],
        suffixes: FLOATS,
        params: &[A::P, A::P, A::P, A::U32, A::U32],
        chains: &["launch.arg(&zs).arg(&bs).arg(&y).arg(&total32).arg(&k32);"],
        evidence: &[
            (
                "cudnn/fused.rs",
                r#"let (total32, k32) = (u32_of(total, "size")?, u32_of(k, "channels")?);"#,
            ),
            (
                "cudnn/fused.rs",
                r#"format!("bias_relu_fwd_nhwc_{}", suffix(T::DTYPE)?)"#,
            ),
        ],
    },
    Launch {
        rs: "cudnn/fused.rs",
        kernels: &["bias_relu_bwd"],
        suffixes: FLOATS,
        params: &[A::P, A::P, A::P, A::PF32, A::U32, A::U32, A::U32],
        chains: &[PACKED_PREFIX[0], PACKED_PREFIX[1], "&[n, k, hw]"],
        evidence: &[
            (
                "cudnn/fused.rs",
                r#""bias_relu_bwd", (&ys, &dys), total, k, grid::bwd(n, k), &[n, k, hw],"#,
            ),
            ("cudnn/fused.rs", "(n, k, hw): (u32, u32, u32),"),
        ],
    },
    Launch {
        rs: "cudnn/fused.rs",
        kernels: &["bias_relu_bwd_nhwc"],
        suffixes: FLOATS,
        params: &[A::P, A::P, A::P, A::PF32, A::U32, A::U32],
        chains: &[PACKED_PREFIX[0], PACKED_PREFIX[1], "&[rows32, k32]"],
        evidence: &[
            (
                "cudnn/fused.rs",
                r#""bias_relu_bwd_nhwc", (&ys, &dys), total, k32, grid::bwd_nhwc(rows32), &[rows32, k32],"#,
            ),
            (
                "cudnn/fused.rs",
                r#"let (rows32, k32) = (u32_of(rows, "rows")?, u32_of(k, "channels")?);"#,
            ),
        ],
    },
    Launch {
        rs: "cudnn/fused.rs",
        kernels: &["bias_relu_fwd_nhwc_v"],
        suffixes: FLOATS,
        params: &[A::P, A::P, A::P, A::U32, A::U32],
        chains: &["launch.arg(&zs).arg(&bs).arg(&y).arg(&vecs).arg(&cvec);"],
        evidence: &[
            (
                "cudnn/fused.rs",
                r#"let vecs = u32_of(total / grid::vec_lanes(std::mem::size_of::<T>()), "size")?;"#,
            ),
            ("cudnn/fused.rs", "if let Some(cvec) = vec_cols(dev, k, &[&zs, &bs]) {"),
            (
                "cudnn/fused.rs",
                r#"format!("bias_relu_fwd_nhwc_v_{}", suffix(T::DTYPE)?)"#,
            ),
        ],
    },
    Launch {
        rs: "cudnn/fused.rs",
        kernels: &["bias_relu_pool_fwd_nhwc_v"],
        suffixes: FLOATS,
        params: &[A::P, A::P, A::P, A::P, A::U32, A::U32, A::U32, A::U32],
        chains: &["launch.arg(&zs).arg(&bs).arg(&y).arg(&p).arg(&n).arg(&cvec).arg(&h).arg(&w);"],
        evidence: &[
            (
                "cudnn/fused.rs",
                "if let (true, Some(cvec)) = (nhwc, vec_cols(dev, k as usize, &[&zs, &bs])) {",
            ),
            (
                "cudnn/fused.rs",
                r#"format!("bias_relu_pool_fwd_nhwc_v_{}", suffix(T::DTYPE)?)"#,
            ),
        ],
    },
    Launch {
        rs: "cudnn/fused.rs",
        kernels: &["bias_relu_pool_fwd_mask_nhwc_v"],
        suffixes: FLOATS,
        params: &[A::P, A::P, A::P, A::PU8, A::U32, A::U32, A::U32, A::U32],
        chains: &["launch.arg(&zs).arg(&bs).arg(&p).arg(&mask).arg(&n).arg(&cvec).arg(&h).arg(&w);"],
        evidence: &[
            (
                "cudnn/fused.rs",
                "let Some(cvec) = vec_cols(dev, k as usize, &[&zs, &bs]) else {",
            ),
            ("cudnn/fused.rs", "let mask = unsafe { dev.alloc::<u8>(pooled) }?;"),
            (
                "cudnn/fused.rs",
                r#"format!("bias_relu_pool_fwd_mask_nhwc_v_{}", suffix(T::DTYPE)?)"#,
            ),
        ],
    },
    Launch {
        rs: "cudnn/fused.rs",
        kernels: &["relu_pool_bwd_mask_nhwc_v"],
        suffixes: FLOATS,
        params: &[A::PU8, A::P, A::P, A::PF32, A::U32, A::U32, A::U32, A::U32],
        chains: &[PACKED_PREFIX[0], PACKED_PREFIX[1], "&[n, cvec, h, w]"],
        evidence: &[
            ("cudnn/fused.rs", "let ms = view::<u8>(mask, lmask)?;"),
            (
                "cudnn/fused.rs",
                r#""relu_pool_bwd_mask_nhwc_v", (&ms, &dps), total, k, (dims, s), &[n, cvec, h, w],"#,
            ),
        ],
    },
    Launch {
        rs: "cudnn/fused.rs",
        kernels: &["bias_relu_bwd_nhwc_v"],
        suffixes: FLOATS,
        params: &[A::P, A::P, A::P, A::PF32, A::U32, A::U32],
        chains: &[PACKED_PREFIX[0], PACKED_PREFIX[1], "&[rows32, cvec]"],
        evidence: &[(
            "cudnn/fused.rs",
            r#""bias_relu_bwd_nhwc_v", (&ys, &dys), total, k32, grid::bwd_nhwc(rows32), &[rows32, cvec],"#,
        )],
    },
    Launch {
        rs: "cudnn/fused.rs",
        kernels: &["relu_pool_bwd_nhwc_v"],
        suffixes: FLOATS,
        params: &[A::P, A::P, A::P, A::PF32, A::U32, A::U32, A::U32, A::U32],
        chains: &[PACKED_PREFIX[0], PACKED_PREFIX[1], "&[n, cvec, h, w]"],
        evidence: &[(
            "cudnn/fused.rs",
            r#""relu_pool_bwd_nhwc_v", (&ys, &dps), total, k, (dims, s), &[n, cvec, h, w],"#,
        )],
    },
    Launch {
        rs: "cudnn/fused.rs",
        kernels: &["relu_pool_bwd", "relu_pool_bwd_nhwc"],
        suffixes: FLOATS,
        params: &[A::P, A::P, A::P, A::PF32, A::U32, A::U32, A::U32, A::U32],
        chains: &[PACKED_PREFIX[0], PACKED_PREFIX[1], "&[n, k, h, w]"],
        evidence: &[
            (
                "cudnn/fused.rs",
                r#"let name = if nhwc { "relu_pool_bwd_nhwc" } else { "relu_pool_bwd" };"#,
            ),
            (
                "cudnn/fused.rs",
                "packed_backward::<T>(dev, name, (&ys, &dps), total, k, (dims, s), &[n, k, h, w])",
            ),
            (
                "cudnn/fused.rs",
                "(n, k, h, w): (u32, u32, u32, u32), total: usize, nhwc: bool,",
            ),
        ],
    },
    Launch {
        rs: "cudnn/fused.rs",
        kernels: &["bias_grad_finish", "bias_grad_finish_wide"],
        suffixes: FLOATS,
        params: &[A::PF32, A::P, A::U32, A::U32],
        chains: &["launch.arg(partial).arg(&mut db).arg(&k).arg(&s);"],
        evidence: &[
            (
                "cudnn/fused.rs",
                "partial: &cudarc::driver::CudaSlice<f32>, out: &mut cudarc::driver::CudaSlice<T>, total: usize, \
                 k: u32, s: u32, sfx: &str,",
            ),
            ("cudnn/fused.rs", r#"format!("{name}_{sfx}")"#),
            (
                "cudnn/fused.rs",
                r#"("bias_grad_finish_wide", grid::finish_wide(k))"#,
            ),
            ("cudnn/fused.rs", r#"("bias_grad_finish", grid::finish(k))"#),
        ],
    },
    // ---- im2col.cu
    Launch {
        rs: "cudnn/im2col.rs",
        kernels: &["im2col_nhwc"],
        suffixes: FLOATS,
        params: &[
            A::P,
            A::P,
            A::U32,
            A::U32,
            A::U32,
            A::U32,
            A::U32,
            A::U32,
            A::U32,
            A::U32,
            A::U32,
            A::U32,
        ],
        chains: &["launch.arg(x).arg(&mut p).arg(&n).arg(&h).arg(&w).arg(&c).arg(&r).arg(&s).arg(&pad).arg(&oh).arg(&ow).arg(&cols32);"],
        evidence: &[(
            "cudnn/im2col.rs",
            r#"format!("im2col_nhwc_{}", suffix(T::DTYPE)?)"#,
        )],
    },
    Launch {
        rs: "cudnn/im2col.rs",
        kernels: &["copy_cols"],
        suffixes: FLOATS,
        params: &[A::P, A::P, A::U32, A::U32, A::U32],
        chains: &["launch.arg(src).arg(&mut dst).arg(&rows32).arg(&sw).arg(&dw);"],
        evidence: &[(
            "cudnn/im2col.rs",
            r#"format!("copy_cols_{}", suffix(T::DTYPE)?)"#,
        )],
    },
    Launch {
        rs: "cudnn/im2col.rs",
        kernels: &["sum_parts"],
        suffixes: FLOATS,
        params: &[A::PF32, A::P, A::U32, A::U32, A::U32, A::U32],
        chains: &["launch.arg(partials).arg(&mut dw).arg(&slots32).arg(&k32).arg(&cols32).arg(&taps32);"],
        evidence: &[
            ("cudnn/im2col.rs", "partials: &CudaSlice<f32>,"),
            (
                "cudnn/im2col.rs",
                r#"format!("sum_parts_{}", suffix(T::DTYPE)?)"#,
            ),
        ],
    },
    // ---- layout.cu
    Launch {
        rs: "cudnn/layout.rs",
        kernels: &["gz_transpose"],
        suffixes: &["b32", "b16"],
        params: &[A::P, A::P, A::U32, A::U32, A::U32],
        chains: &["builder.arg(&src).arg(&dst).arg(&batch).arg(&rows).arg(&cols);"],
        evidence: &[
            (
                "cudnn/layout.rs",
                "let (batch, rows, cols) = (batch as u32, rows as u32, cols as u32);",
            ),
            ("cudnn/layout.rs", r#"DType::F32 => go::<f32>(&dev, s, l, "b32"),"#),
            (
                "cudnn/layout.rs",
                r#"DType::BF16 => go::<half::bf16>(&dev, s, l, "b16"),"#,
            ),
            (
                "cudnn/layout.rs",
                r#"DType::F16 => go::<half::f16>(&dev, s, l, "b16"),"#,
            ),
            ("cudnn/layout.rs", r#"format!("gz_transpose_{sfx}")"#),
        ],
    },
    // ---- dropout.cu
    Launch {
        rs: "dropout.rs",
        kernels: &["gz_dropout"],
        suffixes: FLOATS,
        params: &[A::P, A::P, A::U64, A::U64, A::U32, A::F32],
        chains: &["builder.arg(&x).arg(&y).arg(&n).arg(&op.seed).arg(&op.threshold).arg(&op.scale);"],
        evidence: &[
            ("dropout.rs", "let n = (b - a) as u64;"),
            ("dropout.rs", "pub(crate) seed: u64,"),
            ("dropout.rs", "pub(crate) threshold: u32,"),
            ("dropout.rs", "pub(crate) scale: f32,"),
            ("dropout.rs", r#"DType::F32 => go::<f32>(&dev, op, s, l, "f32"),"#),
            (
                "dropout.rs",
                r#"DType::BF16 => go::<half::bf16>(&dev, op, s, l, "bf16"),"#,
            ),
            ("dropout.rs", r#"DType::F16 => go::<half::f16>(&dev, op, s, l, "f16"),"#),
            ("dropout.rs", r#"format!("gz_dropout_{sfx}")"#),
        ],
    },
    // ---- tree.cu
    Launch {
        rs: "tree.rs",
        kernels: &["tree_fwd"],
        suffixes: &["f32", "f64"],
        params: &[A::P, A::P, A::U32, A::S("Tree"), A::E],
        chains: &["launch.arg(&x).arg(&y).arg(&n).arg(&t).arg(&eps);"],
        evidence: &[
            ("tree.rs", "fn rows(l: &Layout) -> Result<u32>"),
            ("tree.rs", "let n = rows(l)?; let t = launch::table(plan)?;"),
            ("tree.rs", "pub(super) fn table(plan: &Plan) -> Result<Tree>"),
            ("tree.rs", "assert!(size_of::<Tree>() == 200);"),
            ("tree.cu", r#"static_assert(sizeof(Tree) == 200, "Tree layout");"#),
            (
                "tree.rs",
                "DType::F32 => fwd::<f32>(&dev, plan, s, l, plan.eps as f32),",
            ),
            ("tree.rs", "DType::F64 => fwd::<f64>(&dev, plan, s, l, plan.eps),"),
            (
                "tree.rs",
                r#"let sfx = if T::DTYPE == DType::F32 { "f32" } else { "f64" };"#,
            ),
            ("tree.rs", r#"format!("tree_fwd_{sfx}")"#),
        ],
    },
    Launch {
        rs: "tree.rs",
        kernels: &["tree_bwd"],
        suffixes: &["f32", "f64"],
        params: &[A::P, A::P, A::P, A::P, A::U32, A::S("Tree"), A::E],
        chains: &["launch.arg(&xv).arg(&yv).arg(&dyv).arg(&dx).arg(&n).arg(&t).arg(&eps);"],
        evidence: &[
            ("tree.rs", "let n = rows(x.1)?; let t = launch::table(plan)?;"),
            (
                "tree.rs",
                "DType::F32 => bwd::<f32>(&dev, plan, x, y, dy, plan.eps as f32),",
            ),
            ("tree.rs", "DType::F64 => bwd::<f64>(&dev, plan, x, y, dy, plan.eps),"),
            ("tree.rs", r#"format!("tree_bwd_{sfx}")"#),
        ],
    },
    // ---- affine.cu
    Launch {
        rs: "augment.rs",
        kernels: &["affine_sample", "dieleman_parts"],
        suffixes: FLOATS,
        params: &[A::P, A::PF32, A::P, A::U32, A::U32, A::U32, A::U32, A::U32, A::U32],
        chains: &[
            "builder.arg(&input).arg(&mats).arg(&out).arg(&n32).arg(&c32).arg(&h32).arg(&w32).arg(&extra[0])\
             .arg(&extra[1]);",
        ],
        evidence: &[
            ("augment.rs", "let u = |v: usize| { u32::try_from(v)"),
            ("augment.rs", "let extra = [u(extra[0])?, u(extra[1])?];"),
            ("augment.rs", "let (n32, c32, h32, w32) = (u(n)?, u(c)?, u(h)?, u(w)?);"),
            (
                "augment.rs",
                "pub(super) fn kernel_args(&self) -> (Vec<f32>, &'static str, [usize; 2])",
            ),
            ("augment.rs", r#""affine_sample", [*out_h, *out_w],"#),
            ("augment.rs", r#""dieleman_parts", [*view, *part],"#),
            (
                "augment.rs",
                r#"DType::F32 => go::<f32>(&dev, op, s, l, total, "f32"),"#,
            ),
            (
                "augment.rs",
                r#"DType::BF16 => go::<half::bf16>(&dev, op, s, l, total, "bf16"),"#,
            ),
            (
                "augment.rs",
                r#"DType::F16 => go::<half::f16>(&dev, op, s, l, total, "f16"),"#,
            ),
            ("augment.rs", r#"format!("{name}_{sfx}")"#),
        ],
    },
    // ---- optim.cu
    Launch {
        rs: "optim/fused.rs",
        kernels: &["gz_rmsprop"],
        suffixes: FLOATS,
        params: &[A::S("OptimTable"), A::I32, A::F32, A::F32, A::F32, A::F32, A::F32],
        chains: &[
            "b.arg(&table);",
            "b.arg(use_l2).arg(l2).arg(rho).arg(one_minus_rho).arg(eps).arg(lr);",
        ],
        evidence: &[
            (
                "optim/launch.rs",
                "Rmsprop { use_l2: i32, l2: f32, rho: f32, one_minus_rho: f32, eps: f32, lr: f32, },",
            ),
            ("optim/launch.rs", r#"Self::Rmsprop { .. } => "gz_rmsprop","#),
        ],
    },
    Launch {
        rs: "optim/fused.rs",
        kernels: &["gz_sgd_nesterov"],
        suffixes: FLOATS,
        params: &[A::S("OptimTable"), A::I32, A::F32, A::F32, A::F32],
        chains: &["b.arg(&table);", "b.arg(use_l2).arg(l2).arg(momentum).arg(lr);"],
        evidence: &[
            (
                "optim/launch.rs",
                "SgdNesterov { use_l2: i32, l2: f32, momentum: f32, lr: f32, },",
            ),
            ("optim/launch.rs", r#"Self::SgdNesterov { .. } => "gz_sgd_nesterov","#),
        ],
    },
    Launch {
        rs: "optim/fused.rs",
        kernels: &["gz_adamw"],
        suffixes: FLOATS,
        params: &[
            A::S("OptimTable"),
            A::F32,
            A::F32,
            A::F32,
            A::F32,
            A::F32,
            A::F32,
            A::F32,
            A::F32,
            A::F32,
        ],
        chains: &[
            "b.arg(&table);",
            "b.arg(beta1).arg(one_minus_beta1).arg(beta2).arg(one_minus_beta2).arg(inv_bc1).arg(inv_bc2)\
             .arg(decay).arg(eps).arg(lr);",
        ],
        evidence: &[
            (
                "optim/launch.rs",
                "Adamw { beta1: f32, one_minus_beta1: f32, beta2: f32, one_minus_beta2: f32, inv_bc1: f32, \
                 inv_bc2: f32, decay: f32, eps: f32, lr: f32, },",
            ),
            ("optim/launch.rs", r#"Self::Adamw { .. } => "gz_adamw","#),
            // shared by the three optimizers
            ("optim/fused.rs", r#"format!("{}_{sfx}", scalars.kernel())"#),
            ("optim/fused.rs", "let mut table = group.table;"),
            ("optim/launch.rs", "pub(crate) table: Table,"),
            ("optim/launch.rs", "assert!(size_of::<Table>() == 1672);"),
            (
                "optim.cu",
                r#"static_assert(sizeof(OptimTable) == 1672, "OptimTable layout");"#,
            ),
            (
                "optim/fused.rs",
                r#"DType::F32 => run_group::<f32>(&scalars, &group, preps, items, "f32")?,"#,
            ),
            (
                "optim/fused.rs",
                r#"DType::BF16 => run_group::<half::bf16>(&scalars, &group, preps, items, "bf16")?,"#,
            ),
            (
                "optim/fused.rs",
                r#"DType::F16 => run_group::<half::f16>(&scalars, &group, preps, items, "f16")?,"#,
            ),
        ],
    },
];

// ------------------------------------------------------------------------------------------
// The .cu side.

/// A parameter of a kernel as the .cu declares it, in canonical names (u32, i32, u64, f32,
/// f64, u16, bf16, f16, or a struct's name).
#[derive(Clone, Debug, PartialEq, Eq)]
enum C {
    Ptr(String),
    Val(String),
}

fn canonical(ty: &str) -> String {
    match ty {
        "uint32_t" | "unsigned" | "unsigned int" => "u32",
        "int" | "int32_t" | "signed int" => "i32",
        "uint64_t" | "unsigned long long" | "size_t" => "u64",
        "int64_t" | "long long" => "i64",
        "uint16_t" | "unsigned short" => "u16",
        "uint8_t" | "unsigned char" => "u8",
        "float" => "f32",
        "double" => "f64",
        "__half" => "f16",
        "__nv_bfloat16" => "bf16",
        other => other,
    }
    .to_string()
}

/// The storage type a dtype suffix names.
fn storage(suffix: &str) -> &'static str {
    match suffix {
        "f32" => "f32",
        "f64" => "f64",
        "bf16" => "bf16",
        "f16" => "f16",
        "b32" => "u32",
        "b16" => "u16",
        other => panic!("unknown dtype suffix {other}"),
    }
}

fn expected(a: A, suffix: &str) -> C {
    let s = |v: &str| v.to_string();
    match a {
        A::P => C::Ptr(s(storage(suffix))),
        A::PF32 => C::Ptr(s("f32")),
        A::PU8 => C::Ptr(s("u8")),
        A::U32 => C::Val(s("u32")),
        A::U64 => C::Val(s("u64")),
        A::I32 => C::Val(s("i32")),
        A::F32 => C::Val(s("f32")),
        A::E => C::Val(s(storage(suffix))),
        A::S(name) => C::Val(s(name)),
    }
}

/// Comments removed, line continuations joined.
fn preprocess(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let b = src.as_bytes();
    let mut i = 0;
    let mut in_str = false;
    while i < b.len() {
        if in_str {
            if b[i] == b'"' {
                in_str = false;
            }
            out.push(b[i] as char);
            i += 1;
        } else if b[i] == b'"' {
            in_str = true;
            out.push('"');
            i += 1;
        } else if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'\\' && b.get(i + 1) == Some(&b'\n') {
            out.push(' ');
            i += 2;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The text from an opening parenthesis at `open` to its match: (inside, index after it).
fn parens(s: &str, open: usize) -> (&str, usize) {
    assert_eq!(&s[open..open + 1], "(");
    let mut depth = 0;
    for (i, c) in s[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return (&s[open + 1..open + i], open + i + 1);
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses after {:?}", &s[open..s.len().min(open + 60)]);
}

/// `body` with each identifier in `params` replaced by its argument, then `##` pasted.
fn expand(body: &str, params: &[String], args: &[String]) -> String {
    let mut out = String::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        match params.iter().position(|p| p == word) {
            Some(k) => out.push_str(&args[k]),
            None => out.push_str(word),
        }
        word.clear();
    };
    for c in body.chars() {
        if is_ident(c) {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    // token pasting: `a ## b` → `ab`
    while let Some(at) = out.find("##") {
        let left = out[..at].trim_end().len();
        let right = at + 2 + (out[at + 2..].len() - out[at + 2..].trim_start().len());
        out.replace_range(left..right, "");
    }
    out
}

fn split_commas(s: &str) -> Vec<String> {
    s.split(',')
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// One parameter declaration (`const T *__restrict__ x`, `uint32_t n`, `const OptimTable t`).
fn param(decl: &str) -> C {
    let spaced = decl.replace('*', " * ");
    let mut toks: Vec<&str> = spaced
        .split_whitespace()
        .filter(|t| !matches!(*t, "const" | "__restrict__" | "volatile"))
        .collect();
    let name = toks
        .pop()
        .unwrap_or_else(|| panic!("parameter without a name: {decl:?}"));
    assert!(name.chars().all(is_ident), "parameter {decl:?}: unnamed or unparsed");
    let ptr = toks.iter().filter(|t| **t == "*").count();
    let ty = toks
        .iter()
        .filter(|t| **t != "*")
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    match ptr {
        0 => C::Val(canonical(&ty)),
        1 => C::Ptr(canonical(&ty)),
        _ => panic!("parameter {decl:?}: pointers to pointers are not expected"),
    }
}

/// The `extern "C" __global__` kernels defined in `text`: name → parameters.
fn kernels_in(text: &str, out: &mut BTreeMap<String, Vec<C>>) {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let key = "extern \"C\" __global__ void ";
    let mut from = 0;
    while let Some(at) = flat[from..].find(key) {
        let start = from + at + key.len();
        let open = start + flat[start..].find('(').expect("a parameter list");
        let name = flat[start..open].trim().to_string();
        assert!(name.chars().all(is_ident), "kernel name {name:?}");
        let (inside, next) = parens(&flat, open);
        let params = split_commas(inside).iter().map(|d| param(d)).collect();
        assert!(
            out.insert(name.clone(), params).is_none(),
            "kernel {name} defined twice"
        );
        from = next;
    }
}

/// Every kernel of one .cu file, its instantiation macros expanded.
fn parse_cu(src: &str) -> BTreeMap<String, Vec<C>> {
    let text = preprocess(src);
    let mut macros: Vec<(String, Vec<String>, String)> = Vec::new();
    let mut plain = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(def) = t.strip_prefix("#define") {
            let def = def.trim_start();
            let name_end = def.find(|c: char| !is_ident(c)).unwrap_or(def.len());
            // function-like macros only (the name directly followed by '(')
            if def[name_end..].starts_with('(') {
                let (params, next) = parens(def, name_end);
                let body = &def[next..];
                if body.contains("__global__") {
                    macros.push((def[..name_end].to_string(), split_commas(params), body.to_string()));
                }
            }
        } else if !t.starts_with('#') {
            plain.push_str(line);
            plain.push('\n');
        }
    }
    let mut out = BTreeMap::new();
    kernels_in(&plain, &mut out);
    for line in plain.lines() {
        let t = line.trim();
        for (name, params, body) in &macros {
            if let Some(rest) = t.strip_prefix(name.as_str()) {
                if rest.starts_with('(') {
                    let (args, _) = parens(rest, 0);
                    let args = split_commas(args);
                    assert_eq!(args.len(), params.len(), "{name} instantiated with {args:?}");
                    kernels_in(&expand(body, params, &args), &mut out);
                }
            }
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// The checks.

fn src_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn read(rel: &str) -> String {
    let path = if rel.ends_with(".cu") {
        src_dir().join("kernels").join(rel)
    } else {
        src_dir().join(rel)
    };
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn squeeze(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

/// Arguments a chain pushes: its `.arg(` calls, or the elements of a `&[..]` slice.
fn pushes(chain: &str) -> usize {
    if chain.starts_with("for ") {
        0
    } else if let Some(list) = chain.strip_prefix("&[") {
        split_commas(list.trim_end_matches(']')).len()
    } else {
        chain.matches(".arg(").count()
    }
}

fn all_kernels() -> BTreeMap<String, (String, Vec<C>)> {
    let mut all = BTreeMap::new();
    let mut files: Vec<String> = std::fs::read_dir(src_dir().join("kernels"))
        .expect("src/kernels")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    files.sort();
    for f in files {
        for (name, params) in parse_cu(&read(&f)) {
            assert!(
                all.insert(name.clone(), (f.clone(), params)).is_none(),
                "{name} in two .cu files"
            );
        }
    }
    all
}

#[test]
fn the_parser_reads_macro_instances_and_plain_kernels() {
    let src = r#"
        // a comment with extern "C" __global__ void not_a_kernel(int x)
        #define TILE 32
        #define INST(NAME, T) \
            extern "C" __global__ void k_##NAME(const T *__restrict__ x, T *y, uint32_t n, \
                                                 T eps) { body<T>(x, y, n); }
        INST(f32, float)
        INST(bf16, __nv_bfloat16)
        extern "C" __global__ void plain(const OptimTable t, const int flag, uint64_t n, float *p) {}
        /* extern "C" __global__ void commented(int) */
    "#;
    let k = parse_cu(src);
    let names: Vec<&str> = k.keys().map(String::as_str).collect();
    assert_eq!(names, ["k_bf16", "k_f32", "plain"]);
    let v = |s: &str| C::Val(s.to_string());
    let p = |s: &str| C::Ptr(s.to_string());
    assert_eq!(k["k_f32"], [p("f32"), p("f32"), v("u32"), v("f32")]);
    assert_eq!(k["k_bf16"], [p("bf16"), p("bf16"), v("u32"), v("bf16")]);
    assert_eq!(k["plain"], [v("OptimTable"), v("i32"), v("u64"), p("f32")]);
}

#[test]
fn every_launch_matches_its_kernel_and_every_kernel_has_a_launch() {
    let kernels = all_kernels();
    assert!(kernels.len() >= 40, "only {} kernels parsed", kernels.len());
    let mut problems = Vec::new();
    let mut covered = BTreeSet::new();
    for (f, e) in COMMON {
        if !squeeze(&read(f)).contains(&squeeze(e)) {
            problems.push(format!("{f} no longer contains `{e}`"));
        }
    }
    for l in LAUNCHES {
        let file = FILES
            .iter()
            .find(|f| f.rs == l.rs)
            .expect("the launch's file is in FILES");
        let rs = squeeze(&read(l.rs));
        let pushed: usize = l.chains.iter().map(|c| pushes(c)).sum();
        if pushed != l.params.len() {
            problems.push(format!(
                "{:?}: the chains push {pushed} arguments, the entry lists {} parameters",
                l.kernels,
                l.params.len()
            ));
        }
        for c in l.chains {
            if !rs.contains(&squeeze(c)) {
                problems.push(format!("{:?}: {} no longer contains `{c}`", l.kernels, l.rs));
            }
        }
        for (f, e) in l.evidence {
            if !squeeze(&read(f)).contains(&squeeze(e)) {
                problems.push(format!("{:?}: {f} no longer contains `{e}`", l.kernels));
            }
        }
        for k in l.kernels {
            for sfx in l.suffixes {
                let name = format!("{k}_{sfx}");
                covered.insert(name.clone());
                let Some((cu, params)) = kernels.get(&name) else {
                    problems.push(format!("{}: loads {name}, which no .cu defines", l.rs));
                    continue;
                };
                if cu != file.cu {
                    problems.push(format!("{name} is in {cu}, but {} embeds {}", l.rs, file.cu));
                }
                let want: Vec<C> = l.params.iter().map(|a| expected(*a, sfx)).collect();
                if *params != want {
                    problems.push(format!(
                        "{name}: {cu} takes {params:?}, {} pushes {want:?} (entry {:?})",
                        l.rs, l.params
                    ));
                }
            }
        }
    }
    for (name, (cu, _)) in &kernels {
        if !covered.contains(name) {
            problems.push(format!("{cu} defines {name}, which no entry of LAUNCHES covers"));
        }
    }
    assert!(problems.is_empty(), "launch signatures:\n  {}", problems.join("\n  "));
}

#[test]
fn every_arg_push_belongs_to_an_entry_and_each_ptx_has_its_own_module() {
    let mut problems = Vec::new();
    let mut modules = BTreeSet::new();
    for f in FILES {
        let src = read(f.rs);
        let rs = squeeze(&src);
        let stem = f.cu.trim_end_matches(".cu");
        let include = format!(r#"include_str!(concat!(env!("OUT_DIR"),"/{stem}.ptx"))"#);
        if !rs.contains(&include) {
            problems.push(format!("{} does not embed {stem}.ptx as expected", f.rs));
        }
        if !rs.contains(&format!("\"{}\"", f.module)) {
            problems.push(format!("{} does not name its module {:?}", f.rs, f.module));
        }
        if !modules.insert(f.module) {
            problems.push(format!("module name {} used twice", f.module));
        }
        // every `.arg(` of the file is in one of its entries' chains (each chain counted once)
        let chains: BTreeSet<String> = LAUNCHES
            .iter()
            .filter(|l| l.rs == f.rs)
            .flat_map(|l| l.chains.iter().map(|c| squeeze(c)))
            .collect();
        let listed: usize = chains.iter().map(|c| c.matches(".arg(").count()).sum();
        let found = rs.matches(".arg(").count();
        if listed != found {
            problems.push(format!(
                "{}: {found} `.arg(` calls, the entries' chains account for {listed}",
                f.rs
            ));
        }
    }
    // the launch sites are exactly the FILES
    let mut stack = vec![src_dir()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("a source folder").filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).expect("a source file");
                let rel = p
                    .strip_prefix(src_dir())
                    .expect("under src")
                    .to_string_lossy()
                    .replace('\\', "/");
                // (this file names the call in its checks, not to load anything)
                if rel != "launch_signatures.rs"
                    && text.contains("get_or_load_custom_func(")
                    && !FILES.iter().any(|f| f.rs == rel)
                {
                    problems.push(format!("{rel} loads a kernel but is not in FILES"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "launch files:\n  {}", problems.join("\n  "));
}
