//! The C entry points of the emulator's static library: the runtime (`emu/runtime.cpp`) and
//! every kernel of `crates/gz-model/src/kernels/*.cu`, with the argument lists of their
//! `extern "C" __global__` definitions (by-value structs and scalars as in the `.cu` files,
//! device pointers as host pointers). Call a kernel only inside [`crate::launch`].
//!
//! [`Storage`] groups each kernel family's three storage-type instances (f32, bf16, f16) so
//! tests can be generic over the type.

use std::ffi::{c_char, c_int, c_void};

use half::{bf16, f16};

extern "C" {
    pub fn gz_emu_launch(
        grid: *const u32,
        block: *const u32,
        body: extern "C" fn(*mut c_void),
        data: *mut c_void,
        reverse: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    pub fn gz_emu_thread_idx() -> u32;
    pub fn gz_emu_block_idx() -> u32;
    pub fn gz_emu_sync_threads();
    pub fn gz_emu_shfl_down(v: f32, delta: u32, width: i32) -> f32;
}

// layout.cu: a batched 2-D transpose moving 4-byte (f32) or 2-byte (bf16, f16) values as bits.
extern "C" {
    pub fn gz_transpose_b32(src: *const u32, dst: *mut u32, batch: u32, rows: u32, cols: u32);
    pub fn gz_transpose_b16(src: *const u16, dst: *mut u16, batch: u32, rows: u32, cols: u32);
}

/// `struct Tree` of tree.cu, passed by value (the layout gz-model's launcher also uses).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Tree {
    pub questions: u32,
    pub answers: u32,
    pub first: [u32; 16],
    pub len: [u32; 16],
    pub parent: [i32; 16],
}

extern "C" {
    pub fn tree_fwd_f32(x: *const f32, y: *mut f32, rows: u32, t: Tree, eps: f32);
    pub fn tree_bwd_f32(x: *const f32, y: *const f32, dy: *const f32, dx: *mut f32, rows: u32, t: Tree, eps: f32);
    pub fn tree_fwd_f64(x: *const f64, y: *mut f64, rows: u32, t: Tree, eps: f64);
    pub fn tree_bwd_f64(x: *const f64, y: *const f64, dy: *const f64, dx: *mut f64, rows: u32, t: Tree, eps: f64);
}

/// One storage type's instances of the kernels in tree.cu (f32, f64).
///
/// # Safety
/// Every method is the kernel itself: call it only inside [`crate::launch`], with buffers of
/// `rows` × `t.answers` values.
#[allow(clippy::missing_safety_doc, reason = "the trait's `# Safety` covers every method")]
pub unsafe trait TreeStorage: Copy + Send + Sync + 'static {
    unsafe fn tree_fwd(x: *const Self, y: *mut Self, rows: u32, t: Tree, eps: Self);
    unsafe fn tree_bwd(x: *const Self, y: *const Self, dy: *const Self, dx: *mut Self, rows: u32, t: Tree, eps: Self);
}

macro_rules! tree_storage {
    ($t:ty, $fwd:ident, $bwd:ident) => {
        // SAFETY: each method forwards to the kernel of the same name for this type.
        unsafe impl TreeStorage for $t {
            unsafe fn tree_fwd(x: *const Self, y: *mut Self, rows: u32, t: Tree, eps: Self) {
                unsafe { $fwd(x, y, rows, t, eps) }
            }
            unsafe fn tree_bwd(
                x: *const Self,
                y: *const Self,
                dy: *const Self,
                dx: *mut Self,
                rows: u32,
                t: Tree,
                eps: Self,
            ) {
                unsafe { $bwd(x, y, dy, dx, rows, t, eps) }
            }
        }
    };
}

tree_storage!(f32, tree_fwd_f32, tree_bwd_f32);
tree_storage!(f64, tree_fwd_f64, tree_bwd_f64);

/// `struct OptimTable` of optim.cu, passed by value (the layout gz-model's launcher also uses):
/// up to 32 tensors per launch, each with its element count, first block and buffer addresses
/// (host addresses here; 0 for an absent buffer).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OptimTable {
    pub count: u32,
    pub block_start: [u32; 33],
    pub n: [u64; 32],
    pub grad: [u64; 32],
    pub slot0: [u64; 32],
    pub slot1: [u64; 32],
    pub param: [u64; 32],
    pub model: [u64; 32],
}

/// One storage type's instances of the kernels in bias_relu.cu, im2col.cu, affine.cu and optim.cu.
///
/// # Safety
/// Every method is the kernel itself: call it only inside [`crate::launch`], with pointers to
/// buffers that hold what the kernel reads and writes for the given sizes.
#[allow(clippy::too_many_arguments, reason = "the kernels' own argument lists")]
#[allow(clippy::missing_safety_doc, reason = "the trait's `# Safety` covers every method")]
pub unsafe trait Storage: Copy + Send + Sync + 'static {
    unsafe fn bias_relu_fwd(x: *const Self, b: *const Self, y: *mut Self, channels: u32, hw: u32);
    unsafe fn bias_relu_fwd_flat(x: *const Self, b: *const Self, y: *mut Self, total: u32, channels: u32, hw: u32);
    unsafe fn bias_relu_bwd(
        y: *const Self,
        dy: *const Self,
        dz: *mut Self,
        partial: *mut f32,
        batch: u32,
        channels: u32,
        hw: u32,
    );
    unsafe fn bias_grad_finish(partial: *const f32, db: *mut Self, channels: u32, splits: u32);
    unsafe fn bias_grad_finish_wide(partial: *const f32, db: *mut Self, channels: u32, splits: u32);
    unsafe fn bias_relu_pool_fwd_mask_nhwc_v(
        z: *const Self,
        b: *const Self,
        p: *mut Self,
        mask: *mut u8,
        batch: u32,
        cvec: u32,
        h: u32,
        w: u32,
    );
    unsafe fn relu_pool_bwd_mask_nhwc_v(
        mask: *const u8,
        dp: *const Self,
        dz: *mut Self,
        partial: *mut f32,
        batch: u32,
        cvec: u32,
        h: u32,
        w: u32,
    );
    unsafe fn bias_relu_fwd_nhwc(x: *const Self, b: *const Self, y: *mut Self, total: u32, channels: u32);
    unsafe fn bias_relu_bwd_nhwc(
        y: *const Self,
        dy: *const Self,
        dz: *mut Self,
        partial: *mut f32,
        rows: u32,
        channels: u32,
    );
    unsafe fn relu_pool_bwd(
        y: *const Self,
        dp: *const Self,
        dz: *mut Self,
        partial: *mut f32,
        batch: u32,
        channels: u32,
        h: u32,
        w: u32,
    );
    unsafe fn relu_pool_bwd_nhwc(
        y: *const Self,
        dp: *const Self,
        dz: *mut Self,
        partial: *mut f32,
        batch: u32,
        channels: u32,
        h: u32,
        w: u32,
    );
    unsafe fn bias_relu_pool_fwd(
        z: *const Self,
        b: *const Self,
        y: *mut Self,
        p: *mut Self,
        batch: u32,
        channels: u32,
        h: u32,
        w: u32,
    );
    unsafe fn bias_relu_pool_fwd_nhwc(
        z: *const Self,
        b: *const Self,
        y: *mut Self,
        p: *mut Self,
        batch: u32,
        channels: u32,
        h: u32,
        w: u32,
    );
    unsafe fn bias_relu_fwd_nhwc_v(x: *const Self, b: *const Self, y: *mut Self, vecs: u32, cvec: u32);
    unsafe fn bias_relu_bwd_nhwc_v(
        y: *const Self,
        dy: *const Self,
        dz: *mut Self,
        partial: *mut f32,
        rows: u32,
        cvec: u32,
    );
    unsafe fn relu_pool_bwd_nhwc_v(
        y: *const Self,
        dp: *const Self,
        dz: *mut Self,
        partial: *mut f32,
        batch: u32,
        cvec: u32,
        h: u32,
        w: u32,
    );
    unsafe fn bias_relu_pool_fwd_nhwc_v(
        z: *const Self,
        b: *const Self,
        y: *mut Self,
        p: *mut Self,
        batch: u32,
        cvec: u32,
        h: u32,
        w: u32,
    );
    unsafe fn im2col_nhwc(
        x: *const Self,
        p: *mut Self,
        n: u32,
        h: u32,
        w: u32,
        c: u32,
        r: u32,
        s: u32,
        pad: u32,
        oh: u32,
        ow: u32,
        cols: u32,
    );
    unsafe fn copy_cols(src: *const Self, dst: *mut Self, rows: u32, src_w: u32, dst_w: u32);
    /// `sum_parts_*`: dw (k × taps) = the sum of `slots` f32 partial sums of k × cols each.
    unsafe fn sum_parts(partials: *const f32, dw: *mut Self, slots: u32, k: u32, cols: u32, taps: u32);
    unsafe fn affine_sample(
        img: *const Self,
        mats: *const f32,
        out: *mut Self,
        b: u32,
        c: u32,
        h: u32,
        w: u32,
        oh: u32,
        ow: u32,
    );
    unsafe fn dieleman_parts(
        img: *const Self,
        mats: *const f32,
        out: *mut Self,
        b: u32,
        c: u32,
        h: u32,
        w: u32,
        view: u32,
        part: u32,
    );
    unsafe fn rmsprop(t: OptimTable, use_l2: c_int, l2: f32, rho: f32, one_minus_rho: f32, eps: f32, lr: f32);
    unsafe fn sgd_nesterov(t: OptimTable, use_l2: c_int, l2: f32, momentum: f32, lr: f32);
    unsafe fn dropout(x: *const Self, y: *mut Self, n: u64, seed: u64, threshold: u32, scale: f32);
    unsafe fn adamw(
        t: OptimTable,
        beta1: f32,
        one_minus_beta1: f32,
        beta2: f32,
        one_minus_beta2: f32,
        inv_bc1: f32,
        inv_bc2: f32,
        decay: f32,
        eps: f32,
        lr: f32,
    );
}

macro_rules! storage {
    ($t:ty, $m:ident, [
        $fwd:ident, $flat:ident, $bwd:ident, $finish:ident, $fwd_nhwc:ident, $bwd_nhwc:ident,
        $pool_bwd:ident, $pool_bwd_nhwc:ident, $pool_fwd:ident, $pool_fwd_nhwc:ident,
        $affine:ident, $parts:ident, $rmsprop:ident, $sgd:ident, $adamw:ident, $dropout:ident,
        $fwd_v:ident, $bwd_v:ident, $pool_bwd_v:ident, $pool_fwd_v:ident, $im2col:ident, $copy_cols:ident,
        $finish_wide:ident, $pool_fwd_mask_v:ident, $pool_bwd_mask_v:ident, $sum_parts:ident
    ]) => {
        mod $m {
            use super::*;
            extern "C" {
                pub fn $fwd(x: *const $t, b: *const $t, y: *mut $t, channels: u32, hw: u32);
                pub fn $flat(x: *const $t, b: *const $t, y: *mut $t, total: u32, channels: u32, hw: u32);
                pub fn $bwd(
                    y: *const $t,
                    dy: *const $t,
                    dz: *mut $t,
                    partial: *mut f32,
                    batch: u32,
                    channels: u32,
                    hw: u32,
                );
                pub fn $finish(partial: *const f32, db: *mut $t, channels: u32, splits: u32);
                pub fn $finish_wide(partial: *const f32, db: *mut $t, channels: u32, splits: u32);
                pub fn $pool_fwd_mask_v(
                    z: *const $t,
                    b: *const $t,
                    p: *mut $t,
                    mask: *mut u8,
                    batch: u32,
                    cvec: u32,
                    h: u32,
                    w: u32,
                );
                pub fn $pool_bwd_mask_v(
                    mask: *const u8,
                    dp: *const $t,
                    dz: *mut $t,
                    partial: *mut f32,
                    batch: u32,
                    cvec: u32,
                    h: u32,
                    w: u32,
                );
                pub fn $fwd_nhwc(x: *const $t, b: *const $t, y: *mut $t, total: u32, channels: u32);
                pub fn $bwd_nhwc(y: *const $t, dy: *const $t, dz: *mut $t, partial: *mut f32, rows: u32, channels: u32);
                pub fn $pool_bwd(
                    y: *const $t,
                    dp: *const $t,
                    dz: *mut $t,
                    partial: *mut f32,
                    batch: u32,
                    channels: u32,
                    h: u32,
                    w: u32,
                );
                pub fn $pool_bwd_nhwc(
                    y: *const $t,
                    dp: *const $t,
                    dz: *mut $t,
                    partial: *mut f32,
                    batch: u32,
                    channels: u32,
                    h: u32,
                    w: u32,
                );
                pub fn $pool_fwd(
                    z: *const $t,
                    b: *const $t,
                    y: *mut $t,
                    p: *mut $t,
                    batch: u32,
                    channels: u32,
                    h: u32,
                    w: u32,
                );
                pub fn $pool_fwd_nhwc(
                    z: *const $t,
                    b: *const $t,
                    y: *mut $t,
                    p: *mut $t,
                    batch: u32,
                    channels: u32,
                    h: u32,
                    w: u32,
                );
                pub fn $fwd_v(x: *const $t, b: *const $t, y: *mut $t, vecs: u32, cvec: u32);
                pub fn $bwd_v(y: *const $t, dy: *const $t, dz: *mut $t, partial: *mut f32, rows: u32, cvec: u32);
                pub fn $pool_bwd_v(
                    y: *const $t,
                    dp: *const $t,
                    dz: *mut $t,
                    partial: *mut f32,
                    batch: u32,
                    cvec: u32,
                    h: u32,
                    w: u32,
                );
                pub fn $pool_fwd_v(
                    z: *const $t,
                    b: *const $t,
                    y: *mut $t,
                    p: *mut $t,
                    batch: u32,
                    cvec: u32,
                    h: u32,
                    w: u32,
                );
                pub fn $im2col(
                    x: *const $t,
                    p: *mut $t,
                    n: u32,
                    h: u32,
                    w: u32,
                    c: u32,
                    r: u32,
                    s: u32,
                    pad: u32,
                    oh: u32,
                    ow: u32,
                    cols: u32,
                );
                pub fn $copy_cols(src: *const $t, dst: *mut $t, rows: u32, src_w: u32, dst_w: u32);
                pub fn $sum_parts(partials: *const f32, dw: *mut $t, slots: u32, k: u32, cols: u32, taps: u32);
                pub fn $affine(
                    img: *const $t,
                    mats: *const f32,
                    out: *mut $t,
                    b: u32,
                    c: u32,
                    h: u32,
                    w: u32,
                    oh: u32,
                    ow: u32,
                );
                pub fn $parts(
                    img: *const $t,
                    mats: *const f32,
                    out: *mut $t,
                    b: u32,
                    c: u32,
                    h: u32,
                    w: u32,
                    view: u32,
                    part: u32,
                );
                pub fn $rmsprop(t: OptimTable, use_l2: c_int, l2: f32, rho: f32, one_minus_rho: f32, eps: f32, lr: f32);
                pub fn $sgd(t: OptimTable, use_l2: c_int, l2: f32, momentum: f32, lr: f32);
                pub fn $dropout(x: *const $t, y: *mut $t, n: u64, seed: u64, threshold: u32, scale: f32);
                pub fn $adamw(
                    t: OptimTable,
                    beta1: f32,
                    one_minus_beta1: f32,
                    beta2: f32,
                    one_minus_beta2: f32,
                    inv_bc1: f32,
                    inv_bc2: f32,
                    decay: f32,
                    eps: f32,
                    lr: f32,
                );
            }
        }

        // SAFETY: each method forwards to the kernel of the same name for this storage type.
        unsafe impl Storage for $t {
            unsafe fn bias_relu_fwd(x: *const Self, b: *const Self, y: *mut Self, channels: u32, hw: u32) {
                unsafe { $m::$fwd(x, b, y, channels, hw) }
            }
            unsafe fn bias_relu_fwd_flat(
                x: *const Self,
                b: *const Self,
                y: *mut Self,
                total: u32,
                channels: u32,
                hw: u32,
            ) {
                unsafe { $m::$flat(x, b, y, total, channels, hw) }
            }
            unsafe fn bias_relu_bwd(
                y: *const Self,
                dy: *const Self,
                dz: *mut Self,
                partial: *mut f32,
                batch: u32,
                channels: u32,
                hw: u32,
            ) {
                unsafe { $m::$bwd(y, dy, dz, partial, batch, channels, hw) }
            }
            unsafe fn bias_grad_finish(partial: *const f32, db: *mut Self, channels: u32, splits: u32) {
                unsafe { $m::$finish(partial, db, channels, splits) }
            }
            unsafe fn bias_grad_finish_wide(partial: *const f32, db: *mut Self, channels: u32, splits: u32) {
                unsafe { $m::$finish_wide(partial, db, channels, splits) }
            }
            unsafe fn bias_relu_pool_fwd_mask_nhwc_v(
                z: *const Self,
                b: *const Self,
                p: *mut Self,
                mask: *mut u8,
                batch: u32,
                cvec: u32,
                h: u32,
                w: u32,
            ) {
                unsafe { $m::$pool_fwd_mask_v(z, b, p, mask, batch, cvec, h, w) }
            }
            unsafe fn relu_pool_bwd_mask_nhwc_v(
                mask: *const u8,
                dp: *const Self,
                dz: *mut Self,
                partial: *mut f32,
                batch: u32,
                cvec: u32,
                h: u32,
                w: u32,
            ) {
                unsafe { $m::$pool_bwd_mask_v(mask, dp, dz, partial, batch, cvec, h, w) }
            }
            unsafe fn bias_relu_fwd_nhwc(x: *const Self, b: *const Self, y: *mut Self, total: u32, channels: u32) {
                unsafe { $m::$fwd_nhwc(x, b, y, total, channels) }
            }
            unsafe fn bias_relu_bwd_nhwc(
                y: *const Self,
                dy: *const Self,
                dz: *mut Self,
                partial: *mut f32,
                rows: u32,
                channels: u32,
            ) {
                unsafe { $m::$bwd_nhwc(y, dy, dz, partial, rows, channels) }
            }
            unsafe fn relu_pool_bwd(
                y: *const Self,
                dp: *const Self,
                dz: *mut Self,
                partial: *mut f32,
                batch: u32,
                channels: u32,
                h: u32,
                w: u32,
            ) {
                unsafe { $m::$pool_bwd(y, dp, dz, partial, batch, channels, h, w) }
            }
            unsafe fn relu_pool_bwd_nhwc(
                y: *const Self,
                dp: *const Self,
                dz: *mut Self,
                partial: *mut f32,
                batch: u32,
                channels: u32,
                h: u32,
                w: u32,
            ) {
                unsafe { $m::$pool_bwd_nhwc(y, dp, dz, partial, batch, channels, h, w) }
            }
            unsafe fn bias_relu_pool_fwd(
                z: *const Self,
                b: *const Self,
                y: *mut Self,
                p: *mut Self,
                batch: u32,
                channels: u32,
                h: u32,
                w: u32,
            ) {
                unsafe { $m::$pool_fwd(z, b, y, p, batch, channels, h, w) }
            }
            unsafe fn bias_relu_pool_fwd_nhwc(
                z: *const Self,
                b: *const Self,
                y: *mut Self,
                p: *mut Self,
                batch: u32,
                channels: u32,
                h: u32,
                w: u32,
            ) {
                unsafe { $m::$pool_fwd_nhwc(z, b, y, p, batch, channels, h, w) }
            }
            unsafe fn bias_relu_fwd_nhwc_v(x: *const Self, b: *const Self, y: *mut Self, vecs: u32, cvec: u32) {
                unsafe { $m::$fwd_v(x, b, y, vecs, cvec) }
            }
            unsafe fn bias_relu_bwd_nhwc_v(
                y: *const Self,
                dy: *const Self,
                dz: *mut Self,
                partial: *mut f32,
                rows: u32,
                cvec: u32,
            ) {
                unsafe { $m::$bwd_v(y, dy, dz, partial, rows, cvec) }
            }
            unsafe fn relu_pool_bwd_nhwc_v(
                y: *const Self,
                dp: *const Self,
                dz: *mut Self,
                partial: *mut f32,
                batch: u32,
                cvec: u32,
                h: u32,
                w: u32,
            ) {
                unsafe { $m::$pool_bwd_v(y, dp, dz, partial, batch, cvec, h, w) }
            }
            unsafe fn bias_relu_pool_fwd_nhwc_v(
                z: *const Self,
                b: *const Self,
                y: *mut Self,
                p: *mut Self,
                batch: u32,
                cvec: u32,
                h: u32,
                w: u32,
            ) {
                unsafe { $m::$pool_fwd_v(z, b, y, p, batch, cvec, h, w) }
            }
            unsafe fn im2col_nhwc(
                x: *const Self,
                p: *mut Self,
                n: u32,
                h: u32,
                w: u32,
                c: u32,
                r: u32,
                s: u32,
                pad: u32,
                oh: u32,
                ow: u32,
                cols: u32,
            ) {
                unsafe { $m::$im2col(x, p, n, h, w, c, r, s, pad, oh, ow, cols) }
            }
            unsafe fn copy_cols(src: *const Self, dst: *mut Self, rows: u32, src_w: u32, dst_w: u32) {
                unsafe { $m::$copy_cols(src, dst, rows, src_w, dst_w) }
            }
            unsafe fn sum_parts(partials: *const f32, dw: *mut Self, slots: u32, k: u32, cols: u32, taps: u32) {
                unsafe { $m::$sum_parts(partials, dw, slots, k, cols, taps) }
            }
            unsafe fn affine_sample(
                img: *const Self,
                mats: *const f32,
                out: *mut Self,
                b: u32,
                c: u32,
                h: u32,
                w: u32,
                oh: u32,
                ow: u32,
            ) {
                unsafe { $m::$affine(img, mats, out, b, c, h, w, oh, ow) }
            }
            unsafe fn dieleman_parts(
                img: *const Self,
                mats: *const f32,
                out: *mut Self,
                b: u32,
                c: u32,
                h: u32,
                w: u32,
                view: u32,
                part: u32,
            ) {
                unsafe { $m::$parts(img, mats, out, b, c, h, w, view, part) }
            }
            unsafe fn rmsprop(t: OptimTable, use_l2: c_int, l2: f32, rho: f32, one_minus_rho: f32, eps: f32, lr: f32) {
                unsafe { $m::$rmsprop(t, use_l2, l2, rho, one_minus_rho, eps, lr) }
            }
            unsafe fn sgd_nesterov(t: OptimTable, use_l2: c_int, l2: f32, momentum: f32, lr: f32) {
                unsafe { $m::$sgd(t, use_l2, l2, momentum, lr) }
            }
            unsafe fn dropout(x: *const Self, y: *mut Self, n: u64, seed: u64, threshold: u32, scale: f32) {
                unsafe { $m::$dropout(x, y, n, seed, threshold, scale) }
            }
            unsafe fn adamw(
                t: OptimTable,
                beta1: f32,
                one_minus_beta1: f32,
                beta2: f32,
                one_minus_beta2: f32,
                inv_bc1: f32,
                inv_bc2: f32,
                decay: f32,
                eps: f32,
                lr: f32,
            ) {
                unsafe {
                    $m::$adamw(
                        t,
                        beta1,
                        one_minus_beta1,
                        beta2,
                        one_minus_beta2,
                        inv_bc1,
                        inv_bc2,
                        decay,
                        eps,
                        lr,
                    )
                }
            }
        }
    };
}

storage!(
    f32,
    k_f32,
    [
        bias_relu_fwd_f32,
        bias_relu_fwd_flat_f32,
        bias_relu_bwd_f32,
        bias_grad_finish_f32,
        bias_relu_fwd_nhwc_f32,
        bias_relu_bwd_nhwc_f32,
        relu_pool_bwd_f32,
        relu_pool_bwd_nhwc_f32,
        bias_relu_pool_fwd_f32,
        bias_relu_pool_fwd_nhwc_f32,
        affine_sample_f32,
        dieleman_parts_f32,
        gz_rmsprop_f32,
        gz_sgd_nesterov_f32,
        gz_adamw_f32,
        gz_dropout_f32,
        bias_relu_fwd_nhwc_v_f32,
        bias_relu_bwd_nhwc_v_f32,
        relu_pool_bwd_nhwc_v_f32,
        bias_relu_pool_fwd_nhwc_v_f32,
        im2col_nhwc_f32,
        copy_cols_f32,
        bias_grad_finish_wide_f32,
        bias_relu_pool_fwd_mask_nhwc_v_f32,
        relu_pool_bwd_mask_nhwc_v_f32,
        sum_parts_f32
    ]
);
storage!(
    bf16,
    k_bf16,
    [
        bias_relu_fwd_bf16,
        bias_relu_fwd_flat_bf16,
        bias_relu_bwd_bf16,
        bias_grad_finish_bf16,
        bias_relu_fwd_nhwc_bf16,
        bias_relu_bwd_nhwc_bf16,
        relu_pool_bwd_bf16,
        relu_pool_bwd_nhwc_bf16,
        bias_relu_pool_fwd_bf16,
        bias_relu_pool_fwd_nhwc_bf16,
        affine_sample_bf16,
        dieleman_parts_bf16,
        gz_rmsprop_bf16,
        gz_sgd_nesterov_bf16,
        gz_adamw_bf16,
        gz_dropout_bf16,
        bias_relu_fwd_nhwc_v_bf16,
        bias_relu_bwd_nhwc_v_bf16,
        relu_pool_bwd_nhwc_v_bf16,
        bias_relu_pool_fwd_nhwc_v_bf16,
        im2col_nhwc_bf16,
        copy_cols_bf16,
        bias_grad_finish_wide_bf16,
        bias_relu_pool_fwd_mask_nhwc_v_bf16,
        relu_pool_bwd_mask_nhwc_v_bf16,
        sum_parts_bf16
    ]
);
storage!(
    f16,
    k_f16,
    [
        bias_relu_fwd_f16,
        bias_relu_fwd_flat_f16,
        bias_relu_bwd_f16,
        bias_grad_finish_f16,
        bias_relu_fwd_nhwc_f16,
        bias_relu_bwd_nhwc_f16,
        relu_pool_bwd_f16,
        relu_pool_bwd_nhwc_f16,
        bias_relu_pool_fwd_f16,
        bias_relu_pool_fwd_nhwc_f16,
        affine_sample_f16,
        dieleman_parts_f16,
        gz_rmsprop_f16,
        gz_sgd_nesterov_f16,
        gz_adamw_f16,
        gz_dropout_f16,
        bias_relu_fwd_nhwc_v_f16,
        bias_relu_bwd_nhwc_v_f16,
        relu_pool_bwd_nhwc_v_f16,
        bias_relu_pool_fwd_nhwc_v_f16,
        im2col_nhwc_f16,
        copy_cols_f16,
        bias_grad_finish_wide_f16,
        bias_relu_pool_fwd_mask_nhwc_v_f16,
        relu_pool_bwd_mask_nhwc_v_f16,
        sum_parts_f16
    ]
);
