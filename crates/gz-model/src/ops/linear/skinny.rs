//! The dense layer's three products for small batches (at most [`MAX_ROWS`] rows) on the CPU:
//! `y = x·Wᵀ + b`, `dx = dy·W` and `dW = dyᵀ·x`. At a batch of 8 these are matrix–vector work
//! bound by W's memory traffic (Dieleman's first dense layer is 134 MB), where the `gemm`
//! kernel, built for square-ish products, ran at about half PyTorch's speed (`dx`, `y`) and
//! wrote `dW` at a third of the memory bandwidth (`docs/benchmarks.md`).
//!
//! Each kernel streams W (or dW) once, row by row or in column blocks, with the batch's rows of
//! `x` or `dy` in cache, in parallel over disjoint parts of its output; every value is one
//! thread's sum in a fixed order, so the results do not depend on the thread count. On x86-64
//! CPUs with AVX2 and FMA (detected at run time) the same loops are compiled for those
//! instructions (fused multiply-adds); elsewhere plainly (separate multiply and add), so the
//! last bits may differ between machines, never between runs on one.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Batches up to this many rows take these kernels; larger ones the `gemm` kernel. Measured on
/// Dieleman's first dense layer (8,192 → 4,096, 2 threads; ninth session, `docs/benchmarks.md`):
/// at 24 and 32 rows `gemm` took 0.5–0.75× these kernels' time for `y` and `dW` (its packing of W
/// is paid back by then), at 4–8 rows these took 0.35–0.9× `gemm`'s, and at 16 the two were even.
pub(super) const MAX_ROWS: usize = 16;

/// Rows of W (outputs) per rayon task in [`forward`] and [`weight_grad`].
const OUTPUTS_PER_TASK: usize = 16;

/// Columns of W (inputs) per rayon task in [`input_grad`].
const INPUTS_PER_TASK: usize = 256;

/// Accumulators of a dot product (a fixed split of the sum, whatever the machine).
const LANES: usize = 32;

/// `Σ a[i]·b[i]` over the shorter length: `LANES` partial sums in a fixed order, then the tail.
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] = if FMA {
                x[l].mul_add(y[l], acc[l])
            } else {
                acc[l] + x[l] * y[l]
            };
        }
    }
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail = if FMA { x.mul_add(*y, tail) } else { tail + x * y };
    }
    acc.iter().fold(0f32, |s, v| s + v) + tail
}

/// `y[i] += a·x[i]`.
#[inline(always)]
fn axpy<const FMA: bool>(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = if FMA { a.mul_add(*x, *y) } else { *y + a * x };
    }
}

/// One task of [`forward`]: `yt` (outputs of the task × rows) from their rows of W.
#[inline(always)]
fn forward_task<const FMA: bool>(yt: &mut [f32], w: &[f32], x: &[f32], (rows, inputs): (usize, usize)) {
    for (yo, wo) in yt.chunks_mut(rows).zip(w.chunks(inputs)) {
        for (r, out) in yo.iter_mut().enumerate() {
            *out = dot::<FMA>(&x[r * inputs..(r + 1) * inputs], wo);
        }
    }
}

/// One task of [`input_grad`]: `acc` (rows × width) = Σ over outputs o of dy[·][o]·W[o][cols].
#[inline(always)]
fn input_grad_task<const FMA: bool>(
    acc: &mut [f32],
    w: &[f32],
    dy: &[f32],
    (rows, inputs, outputs): (usize, usize, usize),
    (start, width): (usize, usize),
) {
    for o in 0..outputs {
        let wrow = &w[o * inputs + start..o * inputs + start + width];
        for (r, a) in acc.chunks_mut(width).enumerate().take(rows) {
            axpy::<FMA>(a, dy[r * outputs + o], wrow);
        }
    }
}

/// `y[i] = a·x[i]` into uninitialised `y`, returning it initialised.
#[inline(always)]
fn scale_into<'a>(y: &'a mut [MaybeUninit<f32>], a: f32, x: &[f32]) -> &'a mut [f32] {
    assert_eq!(y.len(), x.len());
    for (y, x) in y.iter_mut().zip(x) {
        y.write(a * x);
    }
    // SAFETY: every element was written just above; `MaybeUninit<f32>` has `f32`'s layout.
    unsafe { &mut *(y as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// One task of [`weight_grad`]: rows of dW (uninitialised on entry, all written), each Σ over
/// the batch rows r of dy[r][o]·x[r], the first row's product written rather than added to
/// zeros (the same value: `0 + p` is `p` up to the sign of a zero).
#[inline(always)]
fn weight_grad_task<const FMA: bool>(
    dw: &mut [MaybeUninit<f32>],
    first: usize,
    x: &[f32],
    dy: &[f32],
    (rows, inputs, outputs): (usize, usize, usize),
) {
    for (j, dwo) in dw.chunks_mut(inputs).enumerate() {
        let o = first + j;
        if rows == 0 {
            dwo.fill(MaybeUninit::new(0.0));
            continue;
        }
        let dwo = scale_into(dwo, dy[o], &x[..inputs]);
        for r in 1..rows {
            axpy::<FMA>(dwo, dy[r * outputs + o], &x[r * inputs..(r + 1) * inputs]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod fma {
    //! The tasks compiled for AVX2 + FMA; callers check [`crate::cpu_features::avx2_fma`] first.

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn forward_task(yt: &mut [f32], w: &[f32], x: &[f32], dims: (usize, usize)) {
        super::forward_task::<true>(yt, w, x, dims)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn input_grad_task(
        acc: &mut [f32],
        w: &[f32],
        dy: &[f32],
        dims: (usize, usize, usize),
        cols: (usize, usize),
    ) {
        super::input_grad_task::<true>(acc, w, dy, dims, cols)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weight_grad_task(
        dw: &mut [std::mem::MaybeUninit<f32>],
        first: usize,
        x: &[f32],
        dy: &[f32],
        dims: (usize, usize, usize),
    ) {
        super::weight_grad_task::<true>(dw, first, x, dy, dims)
    }
}

/// `y (rows × outputs) = x (rows × inputs) · wᵀ + b` for `w` (outputs × inputs), `b` (outputs).
pub(super) fn forward(x: &[f32], w: &[f32], b: &[f32], dims: (usize, usize, usize)) -> Vec<f32> {
    forward_with(crate::cpu_features::avx2_fma(), x, w, b, dims)
}

/// [`forward`] with (`fast`, on a CPU [`crate::cpu_features::avx2_fma`] accepts) or without AVX2 + FMA.
fn forward_with(
    fast: bool,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    (rows, inputs, outputs): (usize, usize, usize),
) -> Vec<f32> {
    let mut yt = vec![0f32; outputs * rows];
    if rows > 0 && inputs > 0 {
        yt.par_chunks_mut(OUTPUTS_PER_TASK * rows)
            .zip(w.par_chunks(OUTPUTS_PER_TASK * inputs))
            .for_each(|(yt, w)| {
                #[cfg(target_arch = "x86_64")]
                if fast {
                    // SAFETY: `fast` only where `cpu_features::avx2_fma()` found AVX2 and FMA.
                    return unsafe { fma::forward_task(yt, w, x, (rows, inputs)) };
                }
                let _ = fast;
                forward_task::<false>(yt, w, x, (rows, inputs))
            });
    }
    let mut y = vec![0f32; rows * outputs];
    for (r, row) in y.chunks_mut(outputs.max(1)).enumerate() {
        for (o, v) in row.iter_mut().enumerate() {
            *v = yt[o * rows + r] + b[o];
        }
    }
    y
}

/// `dx (rows × inputs) = dy (rows × outputs) · w` for `w` (outputs × inputs).
pub(super) fn input_grad(dy: &[f32], w: &[f32], dims: (usize, usize, usize)) -> Vec<f32> {
    input_grad_with(crate::cpu_features::avx2_fma(), dy, w, dims)
}

/// [`input_grad`] with or without AVX2 + FMA (as [`forward_with`]).
fn input_grad_with(fast: bool, dy: &[f32], w: &[f32], (rows, inputs, outputs): (usize, usize, usize)) -> Vec<f32> {
    let mut dx = vec![0f32; rows * inputs];
    if rows == 0 || inputs == 0 {
        return dx;
    }
    let blocks: Vec<Vec<f32>> = (0..inputs.div_ceil(INPUTS_PER_TASK))
        .into_par_iter()
        .map(|blk| {
            let start = blk * INPUTS_PER_TASK;
            let width = INPUTS_PER_TASK.min(inputs - start);
            let mut acc = vec![0f32; rows * width];
            let dims = (rows, inputs, outputs);
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: `fast` only where `cpu_features::avx2_fma()` found AVX2 and FMA.
                unsafe { fma::input_grad_task(&mut acc, w, dy, dims, (start, width)) };
                return acc;
            }
            let _ = fast;
            input_grad_task::<false>(&mut acc, w, dy, dims, (start, width));
            acc
        })
        .collect();
    for (blk, acc) in blocks.iter().enumerate() {
        let start = blk * INPUTS_PER_TASK;
        let width = acc.len() / rows;
        for (r, a) in acc.chunks(width).enumerate() {
            dx[r * inputs + start..r * inputs + start + width].copy_from_slice(a);
        }
    }
    dx
}

/// `dw (outputs × inputs) = dyᵀ · x` for `dy` (rows × outputs), `x` (rows × inputs).
pub(super) fn weight_grad(x: &[f32], dy: &[f32], dims: (usize, usize, usize)) -> Vec<f32> {
    weight_grad_with(crate::cpu_features::avx2_fma(), x, dy, dims)
}

/// [`weight_grad`] with or without AVX2 + FMA (as [`forward_with`]).
fn weight_grad_with(fast: bool, x: &[f32], dy: &[f32], (rows, inputs, outputs): (usize, usize, usize)) -> Vec<f32> {
    if inputs == 0 {
        return Vec::new();
    }
    // not zero-filled first: every task writes all of its rows (a 134 MB memset on one thread
    // for Dieleman's first dense layer, and a second pass over dW)
    let mut dw = Vec::<f32>::with_capacity(outputs * inputs);
    dw.spare_capacity_mut()[..outputs * inputs]
        .par_chunks_mut(OUTPUTS_PER_TASK * inputs)
        .enumerate()
        .for_each(|(task, dw)| {
            let first = task * OUTPUTS_PER_TASK;
            let dims = (rows, inputs, outputs);
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: `fast` only where `cpu_features::avx2_fma()` found AVX2 and FMA.
                return unsafe { fma::weight_grad_task(dw, first, x, dy, dims) };
            }
            let _ = fast;
            weight_grad_task::<false>(dw, first, x, dy, dims)
        });
    // SAFETY: the tasks above wrote all `outputs * inputs` elements (chunks cover them).
    unsafe { dw.set_len(outputs * inputs) };
    dw
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| ((i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9)) >> 40) as f32)
            .map(|z| z / (1u64 << 24) as f32 * 2.0 - 1.0)
            .collect()
    }

    /// The three kernels, with and (where the CPU has them) without AVX2 + FMA, against plain
    /// f64 loops, on sizes with partial lanes, tasks and column blocks, and to the bit the same
    /// on 1 and 3 threads.
    #[test]
    fn kernels_match_f64_loops_on_any_threads() {
        for (fast, (rows, inputs, outputs)) in [false, crate::cpu_features::avx2_fma()]
            .into_iter()
            .flat_map(|fast| [(1, 5, 3), (8, 300, 37), (3, 513, 129), (32, 70, 18)].map(|d| (fast, d)))
        {
            let dims = (rows, inputs, outputs);
            let (x, w, b, dy) = (
                values(rows * inputs, 1),
                values(outputs * inputs, 2),
                values(outputs, 3),
                values(rows * outputs, 4),
            );
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("a pool");
                pool.install(|| {
                    (
                        forward_with(fast, &x, &w, &b, dims),
                        input_grad_with(fast, &dy, &w, dims),
                        weight_grad_with(fast, &x, &dy, dims),
                    )
                })
            };
            let (y, dx, dw) = run(1);
            assert_eq!(
                (y.clone(), dx.clone(), dw.clone()),
                run(3),
                "{dims:?} ({fast}): thread count changed a result"
            );
            let close = |got: f32, want: f64, what: &str| {
                assert!(
                    (f64::from(got) - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{dims:?} ({fast}) {what}: {got} vs {want}"
                );
            };
            for r in 0..rows {
                for o in 0..outputs {
                    let want = f64::from(b[o])
                        + (0..inputs)
                            .map(|i| f64::from(x[r * inputs + i]) * f64::from(w[o * inputs + i]))
                            .sum::<f64>();
                    close(y[r * outputs + o], want, "y");
                }
                for i in 0..inputs {
                    let want = (0..outputs)
                        .map(|o| f64::from(dy[r * outputs + o]) * f64::from(w[o * inputs + i]))
                        .sum::<f64>();
                    close(dx[r * inputs + i], want, "dx");
                }
            }
            for o in 0..outputs {
                for i in 0..inputs {
                    let want = (0..rows)
                        .map(|r| f64::from(dy[r * outputs + o]) * f64::from(x[r * inputs + i]))
                        .sum::<f64>();
                    close(dw[o * inputs + i], want, "dw");
                }
            }
        }
    }
}
