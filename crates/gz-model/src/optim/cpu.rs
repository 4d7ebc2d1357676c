//! The fused update on the CPU: the CUDA kernels' per-element arithmetic (`src/kernels/optim.cu`)
//! as one Rust pass per parameter, in place, over rayon chunks. The generic path runs 8–12
//! candle ops per parameter, each a full pass that allocates its result; for VGG16-blog at
//! batch 8 that was about a fifth of a CPU training step (`docs/benchmarks.md`).
//!
//! It computes exactly what [`super::Generic`]'s candle ops compute, to the bit up to the sign
//! of a zero (candle's scalar ops are `affine`, `v * m + 0.0`, which turns −0 into +0): the same
//! IEEE f32 operations in the same order (Rust never contracts `a * b + c` into a fused multiply-add,
//! `sqrt` and `/` are correctly rounded, and the scalars are [`Scalars`], the f32 values candle's
//! `affine` uses), and the bf16/f16 model copy is the master rounded to nearest even, as candle's
//! `to_dtype`. The tests compare the two to the bit. Elements are independent, so the chunking
//! (and the number of threads) cannot change a result.
//!
//! Writing in place: candle hands out `&mut` storage only inside in-place custom ops, so the
//! state slots, the master and the variable are locked by nested [`InplaceOp1`]s, the innermost
//! being `var.inplace_op2(grad, …)`, which also read-locks the gradient. Storages are compared
//! before anything is locked ([`super::storage_id`]): a parameter whose gradient shares storage
//! with a tensor the update writes, or any other parameter that is not eligible (a dtype or
//! layout this path does not take), is left to the generic update.

use std::cell::Cell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Tensor, Var, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use super::launch::Scalars;

/// Elements per rayon task: large enough that a task is worth scheduling.
const CHUNK: usize = 1 << 14;

/// The new (state…, parameter) of one element from its gradient `g` (already f32), state and
/// parameter: the kernels' `rmsprop` / `sgd_nesterov` / `adamw` bodies.
#[inline(always)]
fn update(sc: &Scalars, g: f32, s0: &mut f32, s1: &mut f32, p: f32) -> f32 {
    match *sc {
        Scalars::Rmsprop {
            use_l2,
            l2,
            rho,
            one_minus_rho,
            eps,
            lr,
        } => {
            let g = if use_l2 != 0 { g + p * l2 } else { g };
            let a = *s0 * rho + (g * g) * one_minus_rho;
            *s0 = a;
            p - (g / (a.sqrt() + eps)) * lr
        }
        Scalars::SgdNesterov {
            use_l2,
            l2,
            momentum,
            lr,
        } => {
            let g = if use_l2 != 0 { g + p * l2 } else { g };
            let glr = g * lr;
            let v = *s0 * momentum - glr;
            *s0 = v;
            (p + v * momentum) - glr
        }
        Scalars::Adamw {
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            inv_bc1,
            inv_bc2,
            decay,
            eps,
            lr,
        } => {
            let m = *s0 * beta1 + g * one_minus_beta1;
            let v = *s1 * beta2 + (g * g) * one_minus_beta2;
            *s0 = m;
            *s1 = v;
            let m_hat = m * inv_bc1;
            let v_hat = v * inv_bc2;
            p * decay - (m_hat / (v_hat.sqrt() + eps)) * lr
        }
    }
}

/// The model's storage type: f32 (the parameter itself) or bf16/f16 (the rounded copy of an f32
/// master).
trait Model: WithDType {
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
    /// The exact f32 value (bf16 and f16 widen exactly).
    fn widen(self) -> f32;
    /// Rounded to nearest even, as candle's `to_dtype` from f32.
    fn round(v: f32) -> Self;
}

macro_rules! model {
    ($t:ty, $v:ident, $widen:expr, $round:expr) => {
        impl Model for $t {
            fn widen(self) -> f32 {
                $widen(self)
            }
            fn round(v: f32) -> Self {
                $round(v)
            }
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$v(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$v(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}

model!(f32, F32, |v: f32| v, |v: f32| v);
model!(bf16, BF16, bf16::to_f32, bf16::from_f32);
model!(f16, F16, f16::to_f32, f16::from_f32);

fn f32s(s: &mut CpuStorage) -> Result<&mut [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        other => candle_core::bail!("fused CPU optimizer: f32 state expected, got {:?}", other.dtype()),
    }
}

/// The contiguous range `start..start + n` of a storage, or an error.
fn range<T>(s: &mut [T], start: usize, n: usize) -> Result<&mut [T]> {
    let len = s.len();
    s.get_mut(start..start + n)
        .ok_or_else(|| candle_core::Error::Msg(format!("fused CPU optimizer: {start}..{} of {len}", start + n)))
}

/// Applies the fused update to one parameter on the CPU, or returns `Ok(false)` (having touched
/// nothing) when it is not eligible: every tensor on the CPU and contiguous with the same
/// element count, f32 state, an f32 model without master or a bf16/f16 model with an f32
/// master, the gradient in the model's dtype. A strided gradient is made contiguous first.
pub(super) fn step(sc: &Scalars, grad: &Tensor, state: &[Var], master: Option<&Var>, var: &Var) -> Result<bool> {
    let n = var.elem_count();
    let cpu = |t: &Tensor| t.device().is_cpu();
    if !cpu(var.as_tensor()) || !cpu(grad) || grad.dtype() != var.dtype() || grad.dims() != var.dims() {
        return Ok(false);
    }
    match (var.dtype(), master) {
        (DType::F32, None) => {}
        (DType::BF16 | DType::F16, Some(m)) if m.dtype() == DType::F32 => {}
        _ => return Ok(false),
    }
    if state.len() != sc.slots() || state.iter().any(|s| s.dtype() != DType::F32) {
        return Ok(false);
    }
    let mut starts = Vec::with_capacity(4);
    for t in state.iter().chain(master).chain([var]) {
        let t = t.as_tensor();
        match t.layout().contiguous_offsets() {
            Some((a, b)) if b - a == n && cpu(t) => starts.push(a),
            _ => return Ok(false),
        }
    }
    if n == 0 {
        return Ok(true);
    }
    let grad = if grad.is_contiguous() {
        grad.clone()
    } else {
        grad.contiguous()?
    };
    // Nothing may be locked twice (parking_lot locks are not re-entrant: a gradient sharing a
    // state slot's storage, e.g. one taken from `Optimizer::state()` into a hand-made GradStore,
    // would hang): such a parameter takes the generic update.
    let written: Vec<usize> = state
        .iter()
        .chain(master)
        .chain([var])
        .map(|t| super::storage_id(t.as_tensor()))
        .collect();
    let g_id = super::storage_id(&grad);
    if written.contains(&g_id) || written.iter().enumerate().any(|(i, a)| written[..i].contains(a)) {
        return Ok(false);
    }
    // lock order: state slot(s), the master, then the variable (innermost, with the gradient)
    let s0 = state[0].as_tensor();
    let s1 = state.get(1).map(|s| s.as_tensor());
    let m = master.map(|m| m.as_tensor());
    let (st0, st1) = (starts[0], if s1.is_some() { starts[1] } else { 0 });
    let ms = if m.is_some() { starts[sc.slots()] } else { 0 };
    let vs = starts[starts.len() - 1];
    s0.inplace_op1(&Borrow::new(|a: &mut CpuStorage| {
        let a = range(f32s(a)?, st0, n)?;
        with_opt(s1, |b| {
            let mut none: [f32; 0] = [];
            let b = match b {
                Some(b) => range(f32s(b)?, st1, n)?,
                None => &mut none[..],
            };
            with_opt(m, |p| {
                let master = match p {
                    Some(p) => Some(range(f32s(p)?, ms, n)?),
                    None => None,
                };
                var.as_tensor().inplace_op2(
                    &grad,
                    &Final {
                        sc: *sc,
                        n,
                        var_start: vs,
                        parts: Cell::new(Some((a, b, master))),
                    },
                )
            })
        })
    }))?;
    Ok(true)
}

/// Runs `f` with the locked storage of `t`, or with `None` when there is no `t`.
fn with_opt(t: Option<&Tensor>, f: impl FnOnce(Option<&mut CpuStorage>) -> Result<()>) -> Result<()> {
    match t {
        Some(t) => t.inplace_op1(&Borrow::new(|s: &mut CpuStorage| f(Some(s)))),
        None => f(None),
    }
}

/// A one-shot in-place op handing `f` the locked CPU storage.
struct Borrow<F>(Cell<Option<F>>);

impl<F> Borrow<F> {
    fn new(f: F) -> Self {
        Self(Cell::new(Some(f)))
    }
}

impl<F: FnOnce(&mut CpuStorage) -> Result<()>> InplaceOp1 for Borrow<F> {
    fn name(&self) -> &'static str {
        "gz-fused-cpu-optimizer-borrow"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, _: &Layout) -> Result<()> {
        match self.0.take() {
            Some(f) => f(s),
            None => candle_core::bail!("fused CPU optimizer: storage borrow used twice"),
        }
    }
}

/// The slot(s) and master slices, locked by the outer ops.
type Parts<'a> = (&'a mut [f32], &'a mut [f32], Option<&'a mut [f32]>);

/// The innermost op: the variable (written) and the gradient (read).
struct Final<'a> {
    sc: Scalars,
    n: usize,
    var_start: usize,
    parts: Cell<Option<Parts<'a>>>,
}

impl InplaceOp2 for Final<'_> {
    fn name(&self) -> &'static str {
        "gz-fused-cpu-optimizer"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, _: &Layout, grad: &CpuStorage, gl: &Layout) -> Result<()> {
        let Some((a, b, master)) = self.parts.take() else {
            candle_core::bail!("fused CPU optimizer: update run twice");
        };
        let Some((g0, g1)) = gl.contiguous_offsets() else {
            candle_core::bail!("fused CPU optimizer: gradient is not contiguous");
        };
        if g1 - g0 != self.n {
            candle_core::bail!(
                "fused CPU optimizer: gradient has {} values, expected {}",
                g1 - g0,
                self.n
            );
        }
        match dst.dtype() {
            DType::F32 => apply::<f32>(&self.sc, self.n, self.var_start, dst, grad, g0, a, b, master),
            DType::BF16 => apply::<bf16>(&self.sc, self.n, self.var_start, dst, grad, g0, a, b, master),
            DType::F16 => apply::<f16>(&self.sc, self.n, self.var_start, dst, grad, g0, a, b, master),
            other => candle_core::bail!("fused CPU optimizer: unsupported dtype {other:?}"),
        }
    }
}

/// One chunk's slices: slot 0, slot 1 (AdamW), the f32 master (bf16/f16 models), the variable,
/// the gradient.
type Job<'a, T> = (
    &'a mut [f32],
    Option<&'a mut [f32]>,
    Option<&'a mut [f32]>,
    &'a mut [T],
    &'a [T],
);

/// The pass itself: `a`/`b` the state slots (`b` empty for one slot), `master` the f32 master of
/// a bf16/f16 model (then the variable `dst` receives the rounded copy), else the variable is the
/// f32 parameter.
#[allow(clippy::too_many_arguments)]
fn apply<T: Model>(
    sc: &Scalars,
    n: usize,
    var_start: usize,
    dst: &mut CpuStorage,
    grad: &CpuStorage,
    g0: usize,
    a: &mut [f32],
    b: &mut [f32],
    master: Option<&mut [f32]>,
) -> Result<()> {
    let g = T::slice(grad)
        .and_then(|g| g.get(g0..g0 + n))
        .ok_or_else(|| candle_core::Error::Msg("fused CPU optimizer: gradient storage".into()))?;
    let var = T::slice_mut(dst).ok_or_else(|| candle_core::Error::Msg("fused CPU optimizer: variable dtype".into()))?;
    let var = range(var, var_start, n)?;
    let two = sc.slots() == 2;
    if a.len() != n || (two && b.len() != n) || master.as_ref().is_some_and(|m| m.len() != n) {
        candle_core::bail!("fused CPU optimizer: state or master sizes differ from {n}");
    }
    let mut bs = two.then(|| b.chunks_mut(CHUNK));
    let mut ms = master.map(|m| m.chunks_mut(CHUNK));
    let mut jobs: Vec<Job<'_, T>> = Vec::with_capacity(n.div_ceil(CHUNK));
    for ((a, v), g) in a.chunks_mut(CHUNK).zip(var.chunks_mut(CHUNK)).zip(g.chunks(CHUNK)) {
        let b = bs.as_mut().and_then(|it| it.next());
        let m = ms.as_mut().and_then(|it| it.next());
        jobs.push((a, b, m, v, g));
    }
    // One loop per optimizer, slot count and master, each with its scalars fixed outside the
    // loop, so that the compiler vectorises it (vector square roots and divisions are correctly
    // rounded too: the same bits as the scalar operations). The `use_l2: 0` arms give the
    // compiler a loop without the weight-decay branch; the arms' bodies are the same.
    jobs.into_par_iter().for_each(|(a, b, m, v, g)| match (*sc, b) {
        (sc @ Scalars::Rmsprop { use_l2: 0, .. }, _) => each::<T>(a, m, v, g, |g, s, p| one_slot(&sc, g, s, p)),
        (sc @ Scalars::Rmsprop { .. }, _) => each::<T>(a, m, v, g, |g, s, p| one_slot(&sc, g, s, p)),
        (sc @ Scalars::SgdNesterov { use_l2: 0, .. }, _) => each::<T>(a, m, v, g, |g, s, p| one_slot(&sc, g, s, p)),
        (sc @ Scalars::SgdNesterov { .. }, _) => each::<T>(a, m, v, g, |g, s, p| one_slot(&sc, g, s, p)),
        (sc, Some(b)) => each2::<T>(a, b, m, v, g, |g, s0, s1, p| update(&sc, g, s0, s1, p)),
        (sc, None) => each::<T>(a, m, v, g, |g, s, p| one_slot(&sc, g, s, p)),
    });
    Ok(())
}

/// [`update`] of a one-slot optimizer.
#[inline(always)]
fn one_slot(sc: &Scalars, g: f32, s0: &mut f32, p: f32) -> f32 {
    let mut unused = 0f32;
    update(sc, g, s0, &mut unused, p)
}

/// `f(gradient, slot, parameter)` → new parameter over one chunk, into the master (when there
/// is one) and the variable.
#[inline(always)]
fn each<T: Model>(a: &mut [f32], m: Option<&mut [f32]>, v: &mut [T], g: &[T], f: impl Fn(f32, &mut f32, f32) -> f32) {
    match m {
        Some(m) => {
            for (((a, m), v), g) in a.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                let np = f(g.widen(), a, *m);
                *m = np;
                *v = T::round(np);
            }
        }
        None => {
            for ((a, v), g) in a.iter_mut().zip(v.iter_mut()).zip(g) {
                *v = T::round(f(g.widen(), a, v.widen()));
            }
        }
    }
}

/// [`each`] for a two-slot optimizer.
#[inline(always)]
fn each2<T: Model>(
    a: &mut [f32],
    b: &mut [f32],
    m: Option<&mut [f32]>,
    v: &mut [T],
    g: &[T],
    f: impl Fn(f32, &mut f32, &mut f32, f32) -> f32,
) {
    match m {
        Some(m) => {
            for ((((a, b), m), v), g) in a
                .iter_mut()
                .zip(b.iter_mut())
                .zip(m.iter_mut())
                .zip(v.iter_mut())
                .zip(g)
            {
                let np = f(g.widen(), a, b, *m);
                *m = np;
                *v = T::round(np);
            }
        }
        None => {
            for (((a, b), v), g) in a.iter_mut().zip(b.iter_mut()).zip(v.iter_mut()).zip(g) {
                *v = T::round(f(g.widen(), a, b, v.widen()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The CPU twin against the generic candle ops, to the bit: every optimizer, with and
    //! without weight decay, f32 models and bf16/f16 models with f32 masters, tensors smaller
    //! and larger than a chunk, a strided gradient, a parameter without a gradient, a learning
    //! rate change.

    use candle_core::{DType, Device, Tensor, Var};

    use super::super::{build_with, OptimParams, OptimizerKind, Params, UpdatePath};

    const SHAPES: [&[usize]; 4] = [&[7], &[3, 5], &[40_001], &[6, 4]];

    /// Every tensor's bits after 9 steps: masters, model values, state (sorted by name).
    fn run(dtype: DType, kind: OptimizerKind, hp: &OptimParams, path: UpdatePath) -> (Vec<Vec<u64>>, bool) {
        let dev = Device::Cpu;
        let vars: Vec<(String, Var)> = SHAPES
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let n: usize = s.iter().product();
                let v: Vec<f32> = (0..n)
                    .map(|k| (((k * 7919 + i * 104729) % 1000) as f32 / 500.0 - 1.0) * 0.3)
                    .collect();
                let t = Tensor::from_vec(v, *s, &dev).unwrap().to_dtype(dtype).unwrap();
                (format!("p{i}"), Var::from_tensor(&t).unwrap())
            })
            .collect();
        let mut opt = build_with(kind, Params::new(vars.clone()).unwrap(), 3e-3, hp, path).unwrap();
        for s in 0..9 {
            if s == 5 {
                opt.set_learning_rate(1e-3);
            }
            let mut loss = Tensor::zeros((), DType::F32, &dev).unwrap();
            // p1 gets no gradient at all
            for (i, (_, v)) in vars.iter().enumerate().filter(|(i, _)| *i != 1) {
                let n = v.elem_count();
                let g: Vec<f32> = (0..n)
                    .map(|k| (((k * 31 + s * 17 + i * 5) % 97) as f32 / 97.0 - 0.45) * (1.0 + s as f32 * 0.1))
                    .collect();
                let g = Tensor::from_vec(g, v.shape(), &dev).unwrap().to_dtype(dtype).unwrap();
                loss = (loss
                    + (v.as_tensor() * g)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .sum_all()
                        .unwrap())
                .unwrap();
            }
            let mut grads = loss.backward().unwrap();
            // p3 (6, 4): a transposed, non-contiguous gradient
            let v3 = vars[3].1.as_tensor();
            let g3 = Tensor::arange(0f32, 24.0, &dev)
                .unwrap()
                .affine(0.01 * (s as f64 + 1.0), -0.1)
                .unwrap()
                .reshape((4, 6))
                .unwrap()
                .t()
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            grads.insert(v3, g3);
            opt.step(&grads).unwrap();
        }
        let bits = |t: &Tensor| -> Vec<u64> {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        let masters = opt.params().master_tensors().unwrap();
        let state = opt.state();
        let mut out = Vec::new();
        let mut names: Vec<&String> = masters.keys().collect();
        names.sort();
        out.extend(names.iter().map(|n| bits(&masters[*n])));
        out.extend(vars.iter().map(|(_, v)| bits(v.as_tensor())));
        let mut keys: Vec<&String> = state.keys().collect();
        keys.sort();
        out.extend(keys.iter().map(|k| bits(&state[*k])));
        (out, opt.fused())
    }

    #[test]
    fn cpu_twin_matches_the_generic_update_to_the_bit() {
        for kind in [OptimizerKind::Rmsprop, OptimizerKind::SgdNesterov, OptimizerKind::Adamw] {
            for weight_decay in [0.0, 0.01] {
                let hp = OptimParams {
                    weight_decay,
                    ..OptimParams::default()
                };
                for dtype in [DType::F32, DType::BF16, DType::F16] {
                    // (Fused, not Auto: another test flips the process-wide default)
                    let (twin, fused) = run(dtype, kind, &hp, UpdatePath::Fused);
                    let (generic, not) = run(dtype, kind, &hp, UpdatePath::Generic);
                    assert!(fused && !not, "the CPU twin runs with Fused, not with Generic");
                    for (t, (a, b)) in twin.iter().zip(&generic).enumerate() {
                        if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
                            panic!(
                                "{kind:?} {dtype:?} wd {weight_decay}: tensor {t} element {i}: {} vs generic {}",
                                f64::from_bits(a[i]),
                                f64::from_bits(b[i])
                            );
                        }
                    }
                }
            }
        }
    }

    /// The twin does the work (not the generic fallback): `step` reports every eligible
    /// parameter done and moves it; a gradient sharing a state slot's storage and a gradient of
    /// another dtype are refused (`Ok(false)`, untouched) instead of hanging or failing.
    #[test]
    fn step_updates_eligible_parameters_and_refuses_the_rest() {
        let dev = Device::Cpu;
        let hp = OptimParams::default();
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        for (kind, slots) in [(OptimizerKind::Rmsprop, 1), (OptimizerKind::Adamw, 2)] {
            let sc = super::Scalars::new(kind, &hp, 1e-2, 1);
            for dtype in [DType::F32, DType::BF16] {
                let init = Tensor::new(&[0.5f32, -1.0, 2.0], &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let var = Var::from_tensor(&init).unwrap();
                let master =
                    (dtype != DType::F32).then(|| Var::from_tensor(&init.to_dtype(DType::F32).unwrap()).unwrap());
                let state: Vec<Var> = (0..slots).map(|_| Var::zeros(3, DType::F32, &dev).unwrap()).collect();
                let grad = Tensor::new(&[0.1f32, -0.2, 0.3], &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let before = f32s(var.as_tensor());
                assert!(
                    super::step(&sc, &grad, &state, master.as_ref(), &var).unwrap(),
                    "{kind:?} {dtype:?}"
                );
                let after = f32s(var.as_tensor());
                assert!(
                    before.iter().zip(&after).all(|(a, b)| a != b),
                    "{kind:?} {dtype:?}: {after:?}"
                );
                if dtype == DType::F32 {
                    // the gradient is a state slot (the same storage): refused, nothing locked twice
                    let aliased = state[0].as_tensor().clone();
                    assert!(!super::step(&sc, &aliased, &state, None, &var).unwrap());
                }
                let other = grad.to_dtype(DType::F64).unwrap();
                assert!(!super::step(&sc, &other, &state, master.as_ref(), &var).unwrap());
                assert_eq!(after, f32s(var.as_tensor()), "refused steps touch nothing");
            }
        }
    }

    /// On by default; the switch turns it off for `Auto` (other tests building optimizers at the
    /// same moment may take the generic path then, which gives the same bits).
    #[test]
    fn the_switch_turns_the_twin_off() {
        /// Puts the default back even if the test fails.
        struct Restore;
        impl Drop for Restore {
            fn drop(&mut self) {
                super::super::set_cpu_fused_enabled(true);
            }
        }
        let hp = OptimParams::default();
        let (_, on) = run(DType::F32, OptimizerKind::Rmsprop, &hp, UpdatePath::Auto);
        let _restore = Restore;
        super::super::set_cpu_fused_enabled(false);
        let (_, off) = run(DType::F32, OptimizerKind::Rmsprop, &hp, UpdatePath::Auto);
        assert!(on && !off);
    }
}
