//! The fused CUDA optimizer update: one kernel launch per parameter tensor (`src/kernels/optim.cu`)
//! reads the gradient, applies L2 weight decay where the generic path does, updates the f32
//! state slot(s) and the f32 parameter (the model variable, or the master of a bf16/f16 model)
//! in place and writes the rounded bf16/f16 model copy, with no allocation and no host
//! synchronisation. It computes exactly what [`super::Generic`]'s candle ops compute (same f32
//! operations in the same order, see the kernel's header), so it is a drop-in replacement.
//!
//! # Writing to several candle tensors in place
//!
//! candle only hands out `&mut` storage through its in-place custom ops
//! ([`Tensor::inplace_op1`] / `inplace_op2`), which take the storage's write lock for the
//! duration of the op. One update mutates up to four tensors (state slots, master, model
//! variable), more than one op can lock, so the ops are *nested*: the `cuda_fwd` of the op on
//! the first state slot runs the op on the next tensor, and so on ([`lock_chain`]); the innermost
//! is `var.inplace_op2(grad, ..)`, which also read-locks the gradient. At the launch, this thread
//! therefore holds a genuine write lock, and a safe `&mut CudaStorage`, on every tensor the
//! kernel writes, and a read lock on the gradient, so no other thread can touch them while the
//! launch is enqueued and the kernel arguments are `&mut CudaViewMut`s derived from those
//! borrows (cudarc then records the right read/write events, so even multi-stream use is
//! ordered). No unsafe code is needed for the borrows; the only `unsafe` is the launch itself,
//! whose argument list matches the kernel signatures and whose buffers all hold the `n`
//! elements the kernel touches.
//!
//! Deadlock freedom: parking_lot write locks are not re-entrant, so the nested tensors must not
//! share storage. The state slots and the master are allocated by [`super::Params`] /
//! [`super::build`] for this optimizer alone and never handed out mutably; the model variable is
//! distinct from them; and candle itself checks the gradient against the model variable
//! (`inplace_op2` returns an error rather than locking an aliased source). The gradient is a
//! backprop output, never one of the optimizer's private tensors.
//!
//! Eligibility is checked on the host before anything is locked ([`try_step`] returns
//! `Ok(false)` and the caller runs the generic update): CUDA device, f32 model without master or
//! bf16/f16 model with an f32 master, gradient of the model's dtype on the same device, all
//! tensors contiguous with the same element count. A non-contiguous gradient (e.g. a broadcast)
//! is made contiguous first.

use std::cell::{Cell, RefCell};

use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaDType;
use candle_core::{CpuStorage, CudaStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Tensor, Var};
use cudarc::driver::{CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};

use super::launch::{self, Scalars};
use super::{OptimParams, OptimizerKind};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optim.ptx"));
const MODULE: &str = "gz_optim";

fn err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Cuda(format!("fused optimizer {what}: {e:?}").into())
}

/// Applies the fused update to one parameter, or returns `Ok(false)` (having touched nothing)
/// when the parameter is not eligible and the caller must run the generic update. `steps` is
/// the step count *after* the increment for this step (AdamW's bias correction).
#[allow(clippy::too_many_arguments)]
pub(super) fn try_step(
    kind: OptimizerKind,
    hp: &OptimParams,
    lr: f64,
    steps: u64,
    grad: &Tensor,
    state: &[Var],
    master: Option<&Var>,
    var: &Var,
) -> Result<bool> {
    let scalars = Scalars::new(kind, hp, lr, steps);
    let dev = var.device();
    if !dev.is_cuda() || !grad.device().same_device(dev) || grad.dtype() != var.dtype() {
        return Ok(false);
    }
    match (var.dtype(), master) {
        (DType::F32, None) => {}
        (DType::BF16 | DType::F16, Some(m)) if m.dtype() == DType::F32 => {}
        _ => return Ok(false),
    }
    if state.len() != scalars.slots() || state.iter().any(|s| s.dtype() != DType::F32) {
        return Ok(false);
    }
    let n = var.elem_count();
    if grad.dims() != var.dims() {
        return Ok(false);
    }
    // The tensors the kernel writes, outermost lock first: state slots, then the master.
    let mut outer: Vec<&Tensor> = state.iter().map(|s| s.as_tensor()).collect();
    if let Some(m) = master {
        outer.push(m.as_tensor());
    }
    let mut starts = Vec::with_capacity(outer.len());
    for t in outer.iter().copied().chain([var.as_tensor()]) {
        if !t.device().same_device(dev) || t.elem_count() != n {
            return Ok(false);
        }
        match t.layout().contiguous_offsets() {
            Some((a, b)) if b - a == n => starts.push(a),
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
    let var_start = starts.pop().unwrap_or(0);
    let plan = Launch {
        scalars,
        n,
        starts,
        var_start,
        has_master: master.is_some(),
    };
    lock_chain(&outer, Vec::new(), &mut |held| {
        var.as_tensor().inplace_op2(
            &grad,
            &LaunchOp {
                launch: &plan,
                held: RefCell::new(held),
            },
        )
    })?;
    Ok(true)
}

/// Runs `f` with `&mut` access to the CUDA storage of the tensor the op is applied to (under its
/// write lock), through a one-shot [`InplaceOp1`].
struct Borrow<F>(Cell<Option<F>>);

fn borrow<F: FnOnce(&mut CudaStorage) -> Result<()>>(f: F) -> Borrow<F> {
    Borrow(Cell::new(Some(f)))
}

impl<F: FnOnce(&mut CudaStorage) -> Result<()>> InplaceOp1 for Borrow<F> {
    fn name(&self) -> &'static str {
        "gz-fused-optimizer-borrow"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("the fused optimizer update runs on CUDA only")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, _: &Layout) -> Result<()> {
        match self.0.take() {
            Some(f) => f(storage),
            None => candle_core::bail!("fused optimizer: storage borrow used twice"),
        }
    }
}

/// Write-locks every tensor of `tensors` in order (nested in-place ops, see the module doc) and
/// calls `f` with their storages, in the same order, while all the locks are held.
fn lock_chain<'s>(
    tensors: &[&Tensor],
    held: Vec<&'s mut CudaStorage>,
    f: &mut dyn FnMut(&mut [&mut CudaStorage]) -> Result<()>,
) -> Result<()> {
    let Some((first, rest)) = tensors.split_first() else {
        let mut held = held;
        return f(&mut held);
    };
    first.inplace_op1(&borrow(move |s: &mut CudaStorage| {
        let mut held: Vec<&mut CudaStorage> = held;
        held.push(s);
        lock_chain(rest, held, f)
    }))
}

/// What one launch needs besides the storages.
struct Launch {
    scalars: Scalars,
    n: usize,
    /// Start offsets of the locked outer tensors (state slots, then the master).
    starts: Vec<usize>,
    var_start: usize,
    has_master: bool,
}

/// The innermost op: `dst` is the model variable, the source the gradient, `held` the outer
/// storages (state slots, then the master when there is one).
struct LaunchOp<'l, 'h, 's> {
    launch: &'l Launch,
    held: RefCell<&'h mut [&'s mut CudaStorage]>,
}

impl InplaceOp2 for LaunchOp<'_, '_, '_> {
    fn name(&self) -> &'static str {
        "gz-fused-optimizer"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("the fused optimizer update runs on CUDA only")
    }

    fn cuda_fwd(&self, dst: &mut CudaStorage, _: &Layout, grad: &CudaStorage, gl: &Layout) -> Result<()> {
        let mut held = self
            .held
            .try_borrow_mut()
            .map_err(|_| candle_core::Error::Msg("fused optimizer: storages borrowed twice".into()))?;
        let Some((gs, ge)) = gl.contiguous_offsets() else {
            candle_core::bail!("fused optimizer: gradient is not contiguous");
        };
        if ge - gs != self.launch.n {
            candle_core::bail!(
                "fused optimizer: gradient has {} elements, expected {}",
                ge - gs,
                self.launch.n
            );
        }
        match grad.dtype() {
            DType::F32 => launch::<f32>(self.launch, dst, grad, gs, &mut held, "f32"),
            DType::BF16 => launch::<half::bf16>(self.launch, dst, grad, gs, &mut held, "bf16"),
            DType::F16 => launch::<half::f16>(self.launch, dst, grad, gs, &mut held, "f16"),
            other => candle_core::bail!("fused optimizer: unsupported gradient dtype {other:?}"),
        }
    }
}

fn view<T: CudaDType>(s: &CudaStorage, start: usize, n: usize) -> Result<CudaView<'_, T>> {
    let slice = s.as_cuda_slice::<T>()?;
    let len = slice.len();
    slice
        .try_slice(start..start + n)
        .ok_or_else(|| err("view", format!("{start}..{} exceeds storage of {len}", start + n)))
}

fn view_mut<T: CudaDType>(s: &mut CudaStorage, start: usize, n: usize) -> Result<CudaViewMut<'_, T>> {
    let slice = s.as_cuda_slice_mut::<T>()?;
    let len = slice.len();
    slice
        .try_slice_mut(start..start + n)
        .ok_or_else(|| err("view", format!("{start}..{} exceeds storage of {len}", start + n)))
}

/// Launches `gz_<optimizer>_<sfx>` where T is the gradient (and bf16/f16 model) type.
fn launch<T: CudaDType + DeviceRepr>(
    l: &Launch,
    dst: &mut CudaStorage,
    grad: &CudaStorage,
    grad_start: usize,
    held: &mut [&mut CudaStorage],
    sfx: &str,
) -> Result<()> {
    let n = l.n;
    let slots = l.scalars.slots();
    if held.len() != slots + usize::from(l.has_master) || l.starts.len() != held.len() {
        candle_core::bail!(
            "fused optimizer: {} locked tensors, expected {}",
            held.len(),
            slots + usize::from(l.has_master)
        );
    }
    let dev = dst.device.clone();
    let func = dev.get_or_load_custom_func(&format!("{}_{sfx}", l.scalars.kernel()), MODULE, PTX)?;
    let g = view::<T>(grad, grad_start, n)?;
    let (states, rest) = held.split_at_mut(slots);
    let (state_starts, rest_starts) = l.starts.split_at(slots);
    let mut st: Vec<CudaViewMut<'_, f32>> = Vec::with_capacity(2);
    for (s, &start) in states.iter_mut().zip(state_starts) {
        st.push(view_mut::<f32>(s, start, n)?);
    }
    // The f32 parameter and the rounded model copy (none for f32 models).
    let (mut p, mut model) = match (rest.first_mut(), rest_starts.first()) {
        (Some(master), Some(&ms)) => (
            view_mut::<f32>(master, ms, n)?,
            Some(view_mut::<T>(dst, l.var_start, n)?),
        ),
        _ => (view_mut::<f32>(dst, l.var_start, n)?, None),
    };
    let null: u64 = 0;
    let n64 = n as u64;
    let (grid_dim, block_dim) = launch::grid(n64);
    let cfg = LaunchConfig {
        grid_dim,
        block_dim,
        shared_mem_bytes: 0,
    };
    let mut b = func.builder();
    b.arg(&n64).arg(&g);
    let (s0, s1) = match st.as_mut_slice() {
        [a] => (a, None),
        [a, c] => (a, Some(c)),
        _ => candle_core::bail!("fused optimizer: {} state slots", st.len()),
    };
    b.arg(s0);
    if let Some(s1) = s1 {
        b.arg(s1);
    }
    b.arg(&mut p);
    match model.as_mut() {
        Some(m) => b.arg(m),
        None => b.arg(&null),
    };
    let sc = l.scalars;
    match &sc {
        Scalars::Rmsprop {
            use_l2,
            l2,
            rho,
            one_minus_rho,
            eps,
            lr,
        } => {
            b.arg(use_l2).arg(l2).arg(rho).arg(one_minus_rho).arg(eps).arg(lr);
        }
        Scalars::SgdNesterov {
            use_l2,
            l2,
            momentum,
            lr,
        } => {
            b.arg(use_l2).arg(l2).arg(momentum).arg(lr);
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
            b.arg(beta1)
                .arg(one_minus_beta1)
                .arg(beta2)
                .arg(one_minus_beta2)
                .arg(inv_bc1)
                .arg(inv_bc2)
                .arg(decay)
                .arg(eps)
                .arg(lr);
        }
    }
    // SAFETY: the argument list matches `gz_<optimizer>_<sfx>` in optim.cu (u64 n, const T*
    // grad, f32* state slot(s), f32* param, T* model or null, then the scalars as i32/f32); each
    // buffer is a view of exactly n elements of a distinct allocation (the write locks held by
    // the caller prove distinctness), which is all the kernel touches.
    unsafe { b.launch(cfg) }.map_err(|e| err("launch", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Fused vs generic update on the GPU (`cargo test -p gz-model --features cudnn --lib
    //! optim::fused`); without a CUDA device each test says so and passes.

    use super::super::{build_with, OptimParams, OptimizerKind, Params, UpdatePath};
    use candle_core::{DType, Device, Tensor, Var};

    /// The GPU, held exclusively for the test (`crate::testutil::gpu`).
    fn cuda() -> Option<crate::testutil::Gpu> {
        crate::testutil::gpu()
    }

    /// A few parameters of awkward sizes (not multiples of the block, one bigger than a block).
    fn init(dev: &Device, dtype: DType) -> Vec<(String, Var)> {
        let shapes: [&[usize]; 4] = [&[7], &[3, 5], &[4, 3, 3, 3], &[1031]];
        shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let n: usize = s.iter().product();
                let v: Vec<f32> = (0..n)
                    .map(|k| (((k * 7919 + i * 104729) % 1000) as f32 / 500.0 - 1.0) * 0.3)
                    .collect();
                let t = Tensor::from_vec(v, *s, dev).unwrap().to_dtype(dtype).unwrap();
                (format!("p{i}"), Var::from_tensor(&t).unwrap())
            })
            .collect()
    }

    /// A deterministic per-step gradient for each parameter, in the model's dtype.
    fn grad_for(var: &Var, step: usize, i: usize) -> Tensor {
        let n = var.elem_count();
        let v: Vec<f32> = (0..n)
            .map(|k| {
                let x = ((k * 31 + step * 17 + i * 5) % 97) as f32 / 97.0 - 0.45;
                x * (1.0 + step as f32 * 0.1)
            })
            .collect();
        Tensor::from_vec(v, var.shape(), var.device())
            .unwrap()
            .to_dtype(var.dtype())
            .unwrap()
    }

    /// What a run ends with, each tensor flattened to f32 (sorted by name).
    struct Outcome {
        params: Vec<Vec<f32>>,
        model: Vec<Vec<f32>>,
        state: Vec<Vec<f32>>,
        fused: bool,
    }

    /// Runs `steps` updates with gradients from a loss Σ grad·var (so backprop yields exactly
    /// `grad`), returning the f32 parameter values, the model values (as f32) and the state.
    fn run(
        dev: &Device,
        dtype: DType,
        kind: OptimizerKind,
        hp: &OptimParams,
        path: UpdatePath,
        steps: usize,
    ) -> Outcome {
        let vars = init(dev, dtype);
        let params = Params::new(vars.clone()).unwrap();
        let mut opt = build_with(kind, params, 3e-3, hp, path).unwrap();
        let fused = opt.fused();
        for s in 0..steps {
            if s == steps / 2 {
                opt.set_learning_rate(1e-3);
            }
            let mut loss = Tensor::zeros((), DType::F32, dev).unwrap();
            for (i, (_, v)) in vars.iter().enumerate() {
                let g = grad_for(v, s, i);
                let term = (v.as_tensor() * g)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                loss = (loss + term).unwrap();
            }
            let grads = loss.backward().unwrap();
            opt.step(&grads).unwrap();
        }
        let flat = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let masters = opt.params().master_tensors().unwrap();
        let mut names: Vec<&String> = masters.keys().collect();
        names.sort();
        let p = names.iter().map(|n| flat(&masters[*n])).collect();
        let m = vars.iter().map(|(_, v)| flat(v.as_tensor())).collect();
        let state = opt.state();
        let mut keys: Vec<&String> = state.keys().collect();
        keys.sort();
        let st = keys.iter().map(|k| flat(&state[*k])).collect();
        Outcome {
            params: p,
            model: m,
            state: st,
            fused,
        }
    }

    fn assert_close(what: &str, a: &[Vec<f32>], b: &[Vec<f32>], rel: f32) {
        assert_eq!(a.len(), b.len(), "{what}: tensor count");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(x.len(), y.len(), "{what}[{i}]: length");
            // Relative to the element, or to the tensor's largest value for elements near 0.
            let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (k, (u, v)) in x.iter().zip(y).enumerate() {
                let tol = rel * v.abs().max(1e-3 * scale).max(f32::MIN_POSITIVE);
                assert!(
                    (u - v).abs() <= tol,
                    "{what}[{i}][{k}]: fused {u} vs generic {v} (tolerance {tol})"
                );
            }
        }
    }

    fn compare(dtype: DType, kind: OptimizerKind, hp: OptimParams) {
        let Some(dev) = cuda() else { return };
        let steps = 20;
        let f = run(&dev, dtype, kind, &hp, UpdatePath::Fused, steps);
        let g = run(&dev, dtype, kind, &hp, UpdatePath::Generic, steps);
        assert!(f.fused, "the fused path should be active on CUDA");
        assert!(!g.fused);
        let (pf, mf, sf) = (&f.params, &f.model, &f.state);
        let (pg, mg, sg) = (&g.params, &g.model, &g.state);
        let tag = format!("{kind:?} {dtype:?}");
        assert_close(&format!("{tag} params"), pf, pg, 1e-6);
        assert_close(&format!("{tag} state"), sf, sg, 1e-6);
        // The params moved (the test is not vacuous).
        let init: Vec<Vec<f32>> = init(&dev, dtype)
            .iter()
            .map(|(_, v)| {
                v.as_tensor()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        assert!(pf.iter().zip(&init).any(|(a, b)| a != b), "{tag}: nothing moved");
        if dtype == DType::F32 {
            assert_close(&format!("{tag} model"), mf, mg, 1e-6);
        } else {
            // The model copy is exactly the master rounded to the model dtype.
            for (i, (m, p)) in mf.iter().zip(pf).enumerate() {
                let want = Tensor::new(p.as_slice(), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                assert_eq!(m, &want, "{tag} model[{i}] is not the rounded master");
            }
        }
    }

    fn with_l2() -> OptimParams {
        OptimParams {
            weight_decay: 1e-2,
            ..Default::default()
        }
    }

    #[test]
    fn fused_rmsprop_f32_matches_generic() {
        compare(DType::F32, OptimizerKind::Rmsprop, OptimParams::default());
        compare(DType::F32, OptimizerKind::Rmsprop, with_l2());
    }

    #[test]
    fn fused_rmsprop_bf16_matches_generic() {
        compare(DType::BF16, OptimizerKind::Rmsprop, OptimParams::default());
        compare(DType::BF16, OptimizerKind::Rmsprop, with_l2());
    }

    #[test]
    fn fused_sgd_nesterov_f32_matches_generic() {
        compare(DType::F32, OptimizerKind::SgdNesterov, OptimParams::default());
        compare(DType::F32, OptimizerKind::SgdNesterov, with_l2());
    }

    #[test]
    fn fused_sgd_nesterov_bf16_matches_generic() {
        compare(DType::BF16, OptimizerKind::SgdNesterov, OptimParams::default());
        compare(DType::BF16, OptimizerKind::SgdNesterov, with_l2());
    }

    #[test]
    fn fused_adamw_f32_matches_generic() {
        compare(DType::F32, OptimizerKind::Adamw, OptimParams::default());
        compare(DType::F32, OptimizerKind::Adamw, with_l2());
    }

    #[test]
    fn fused_adamw_bf16_matches_generic() {
        compare(DType::BF16, OptimizerKind::Adamw, OptimParams::default());
        compare(DType::BF16, OptimizerKind::Adamw, with_l2());
    }

    #[test]
    fn fused_f16_matches_generic() {
        for kind in [OptimizerKind::Rmsprop, OptimizerKind::SgdNesterov, OptimizerKind::Adamw] {
            compare(DType::F16, kind, with_l2());
        }
    }

    /// Gradients that are not plain contiguous buffers (a broadcast, a transpose, a view with a
    /// start offset) go through the fused path too (made contiguous first, or read at their
    /// offset) and match the generic update.
    #[test]
    fn fused_handles_strided_gradients() {
        let Some(dev) = cuda() else { return };
        let run = |path: UpdatePath| -> (Vec<f32>, bool) {
            let var = Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0, 2.0], [0.0, 1.5, -0.25]], &dev).unwrap()).unwrap();
            let params = Params::new(vec![("w".into(), var.clone())]).unwrap();
            let mut opt = build_with(OptimizerKind::Adamw, params, 0.01, &OptimParams::default(), path).unwrap();
            let base = Tensor::arange(0f32, 12.0, &dev).unwrap().affine(0.1, -0.5).unwrap();
            for k in 0..6 {
                let loss = var.as_tensor().sum_all().unwrap();
                let mut grads = loss.backward().unwrap();
                let g = match k % 3 {
                    // stride 0 along the first dimension
                    0 => base
                        .narrow(0, 0, 3)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap()
                        .broadcast_as((2, 3))
                        .unwrap(),
                    // a transpose
                    1 => base.narrow(0, 0, 6).unwrap().reshape((3, 2)).unwrap().t().unwrap(),
                    // contiguous, at offset 5 of its storage
                    _ => base.narrow(0, 5, 6).unwrap().reshape((2, 3)).unwrap(),
                };
                grads.insert(var.as_tensor(), g);
                opt.step(&grads).unwrap();
            }
            (var.as_tensor().flatten_all().unwrap().to_vec1().unwrap(), opt.fused())
        };
        let (fused, on) = run(UpdatePath::Fused);
        let (generic, off) = run(UpdatePath::Generic);
        assert!(on && !off);
        assert_close("strided", &[fused], &[generic], 1e-6);
    }

    /// Saving the state of a fused run and resuming it with the generic path (and the other
    /// way round) continues identically: the two paths share the state layout.
    #[test]
    fn fused_and_generic_state_interchange() {
        let Some(dev) = cuda() else { return };
        let hp = OptimParams::default();
        let make = |path: UpdatePath| {
            let vars = init(&dev, DType::BF16);
            let params = Params::new(vars.clone()).unwrap();
            (vars, build_with(OptimizerKind::Adamw, params, 1e-3, &hp, path).unwrap())
        };
        let step = |vars: &[(String, Var)], opt: &mut Box<dyn super::super::Optimizer>, s: usize| {
            let mut loss = Tensor::zeros((), DType::F32, &dev).unwrap();
            for (i, (_, v)) in vars.iter().enumerate() {
                let term = (v.as_tensor() * grad_for(v, s, i))
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                loss = (loss + term).unwrap();
            }
            opt.step(&loss.backward().unwrap()).unwrap();
        };
        let (va, mut a) = make(UpdatePath::Fused);
        for s in 0..4 {
            step(&va, &mut a, s);
        }
        let (vb, mut b) = make(UpdatePath::Generic);
        b.params().load_masters(&a.params().master_tensors().unwrap()).unwrap();
        b.load_state(&a.state(), a.steps()).unwrap();
        for s in 4..8 {
            step(&va, &mut a, s);
            step(&vb, &mut b, s);
        }
        let flat = |o: &dyn super::super::Optimizer| -> Vec<Vec<f32>> {
            let m = o.params().master_tensors().unwrap();
            let mut k: Vec<&String> = m.keys().collect();
            k.sort();
            k.iter()
                .map(|k| m[*k].flatten_all().unwrap().to_vec1().unwrap())
                .collect()
        };
        assert_close("resumed", &flat(a.as_ref()), &flat(b.as_ref()), 1e-6);
    }
}
