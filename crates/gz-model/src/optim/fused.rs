//! The fused CUDA optimizer update (`src/kernels/optim.cu`): one kernel launch updates up to 32
//! parameter tensors (multi-tensor apply, [`super::launch::groups`]): it reads each gradient,
//! applies L2 weight decay where the generic path does, updates the f32 state slot(s) and the
//! f32 parameter (the model variable, or the master of a bf16/f16 model) in place and writes
//! the rounded bf16/f16 model copy, with no allocation and no host synchronisation. A model's
//! whole update is ⌈tensors / 32⌉ launches per gradient dtype (VGG16-blog: one launch for its
//! 32 tensors, where the generic path runs 8-12 candle ops for each). It computes exactly what
//! [`super::Generic`]'s candle ops compute (same f32 operations in the same order, see the
//! kernel's header), so it is a drop-in replacement. `GZ_OPTIM_TENSORS=1`
//! ([`super::set_tensors_per_launch`]) launches once per tensor instead, for comparisons.
//!
//! # Writing to many candle tensors in place
//!
//! candle only hands out `&mut` storage through its in-place custom ops
//! ([`Tensor::inplace_op1`]), which take the storage's write lock for the duration of the op.
//! One launch mutates up to 32 × 4 tensors (state slots, master, model variable per parameter),
//! so the ops are *nested*: the `cuda_fwd` of the op on the first tensor runs the op on the next
//! tensor, and so on ([`lock_chain`]); inside the innermost, the gradients are read-locked with
//! [`Tensor::storage_and_layout`]. At the launch this thread therefore holds a genuine write
//! lock, and a safe `&mut CudaStorage`, on every tensor the kernel writes and a read lock on
//! every gradient, so no other thread can touch them while the launch is enqueued. The kernel
//! gets the buffers' device addresses in a table passed by value; each address comes from
//! cudarc's `device_ptr`/`device_ptr_mut` on the locked storage, whose guards live until after
//! the launch (so cudarc records its read/write events, when event tracking is on, as for any
//! launch). The `unsafe` parts are the launch itself, whose arguments match the kernel
//! signatures, and the addresses, each checked to cover the `n` elements the kernel touches.
//!
//! Deadlock freedom: parking_lot locks are not re-entrant, so no two written tensors may share
//! storage, no gradient may share storage with a written tensor, and no storage may be
//! read-locked twice. Before anything is locked, [`step_all`] identifies every storage
//! ([`super::storage_id`]) and leaves to the generic update any parameter whose written tensors share
//! storage with a gradient or with another parameter's written tensors (a variable listed
//! twice, a gradient inserted by hand that is a variable); gradients that share storage with
//! each other are read-locked once. With backprop's gradients and the optimizer's own state
//! none of this happens (the state and masters are allocated for this optimizer alone, and
//! gradients are fresh tensors), but a hang would be the wrong answer to a hand-made
//! `GradStore`.
//!
//! Eligibility is checked per parameter on the host before anything is locked ([`step_all`]
//! reports, per parameter, whether it was updated; the caller runs the generic update for the
//! rest): CUDA device, f32 model without master or bf16/f16 model with an f32 master, gradient
//! of the model's dtype on the same device, all tensors contiguous with the same element count.
//! A non-contiguous gradient (e.g. a broadcast) is made contiguous first.

use std::cell::Cell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::cuda::CudaDType;
use candle_core::{CpuStorage, CudaStorage, DType, InplaceOp1, Layout, Result, Storage, StorageRef, Tensor, Var};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, SyncOnDrop};

use super::launch::{self, Group, Scalars, Table};
use super::{storage_id, OptimParams, OptimizerKind};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optim.ptx"));
const MODULE: &str = "gz_optim";

/// Launches made by this process (the tests check the grouping with it).
static LAUNCHES: AtomicU64 = AtomicU64::new(0);

// SAFETY: plain old data with the C layout of `struct OptimTable` in optim.cu (u32 and u64
// fields only; the size is asserted in `launch.rs`).
unsafe impl DeviceRepr for Table {}

fn err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Cuda(format!("fused optimizer {what}: {e:?}").into())
}

/// One parameter's update: its gradient, state slots, master (bf16/f16 models) and variable.
pub(super) struct Item<'a> {
    pub(super) grad: &'a Tensor,
    pub(super) state: &'a [Var],
    pub(super) master: Option<&'a Var>,
    pub(super) var: &'a Var,
}

/// An eligible parameter, checked on the host.
struct Prepared {
    /// Index into the caller's items.
    item: usize,
    /// The gradient, contiguous.
    grad: Tensor,
    /// [`super::storage_id`] of the gradient.
    grad_storage: usize,
    n: usize,
    /// Start offsets of the written tensors in lock order: state slots, master, variable.
    starts: Vec<usize>,
}

/// Applies the fused update to every eligible parameter of `items` and returns, per item,
/// whether it is done (`false`: not eligible and untouched, the caller runs the generic update).
/// `steps` is the step count *after* the increment for this step (AdamW's bias correction);
/// `per_launch` caps the tensors per launch (1..=32).
pub(super) fn step_all(
    kind: OptimizerKind,
    hp: &OptimParams,
    lr: f64,
    steps: u64,
    items: &[Item<'_>],
    per_launch: usize,
) -> Result<Vec<bool>> {
    let scalars = Scalars::new(kind, hp, lr, steps);
    let mut done = vec![false; items.len()];
    // by gradient dtype: one kernel instance per launch
    let mut buckets: [(DType, Vec<Prepared>); 3] = [(DType::F32, vec![]), (DType::BF16, vec![]), (DType::F16, vec![])];
    let mut prepared = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Some(p) = prepare(&scalars, i, item)? else {
            continue;
        };
        if p.n == 0 {
            done[i] = true;
            continue;
        }
        prepared.push(p);
    }
    // No storage may be write-locked twice, or read-locked (as a gradient) while write-locked:
    // parking_lot locks are not re-entrant, so either would hang this thread. A parameter whose
    // written tensors share storage with any gradient, or with an earlier parameter's written
    // tensors (a variable listed twice), is left to the generic update.
    let grad_storages: HashSet<usize> = prepared.iter().map(|p| p.grad_storage).collect();
    let mut written_storages = HashSet::new();
    for p in prepared {
        let ids: Vec<usize> = written(&items[p.item]).map(storage_id).collect();
        let distinct = ids.iter().collect::<HashSet<_>>().len() == ids.len();
        if !distinct
            || ids
                .iter()
                .any(|id| grad_storages.contains(id) || written_storages.contains(id))
        {
            continue;
        }
        written_storages.extend(ids);
        if let Some((_, b)) = buckets.iter_mut().find(|(d, _)| *d == items[p.item].var.dtype()) {
            b.push(p);
        }
    }
    for (dtype, preps) in &buckets {
        let ns: Vec<u64> = preps.iter().map(|p| p.n as u64).collect();
        for group in launch::groups(&ns, per_launch, None) {
            let preps = &preps[group.tensors.clone()];
            match dtype {
                DType::F32 => run_group::<f32>(&scalars, &group, preps, items, "f32")?,
                DType::BF16 => run_group::<half::bf16>(&scalars, &group, preps, items, "bf16")?,
                DType::F16 => run_group::<half::f16>(&scalars, &group, preps, items, "f16")?,
                other => candle_core::bail!("fused optimizer: unsupported dtype {other:?}"),
            }
            for p in preps {
                done[p.item] = true;
            }
        }
    }
    Ok(done)
}

/// The host-side checks of one parameter; `None` when it is not eligible.
fn prepare(scalars: &Scalars, i: usize, item: &Item<'_>) -> Result<Option<Prepared>> {
    let Item {
        grad,
        state,
        master,
        var,
    } = *item;
    let dev = var.device();
    if !dev.is_cuda() || !grad.device().same_device(dev) || grad.dtype() != var.dtype() {
        return Ok(None);
    }
    match (var.dtype(), master) {
        (DType::F32, None) => {}
        (DType::BF16 | DType::F16, Some(m)) if m.dtype() == DType::F32 => {}
        _ => return Ok(None),
    }
    if state.len() != scalars.slots() || state.iter().any(|s| s.dtype() != DType::F32) {
        return Ok(None);
    }
    let n = var.elem_count();
    if grad.dims() != var.dims() {
        return Ok(None);
    }
    let mut starts = Vec::with_capacity(4);
    for t in written(item) {
        if !t.device().same_device(dev) || t.elem_count() != n {
            return Ok(None);
        }
        match t.layout().contiguous_offsets() {
            Some((a, b)) if b - a == n => starts.push(a),
            _ => return Ok(None),
        }
    }
    let grad = if grad.is_contiguous() {
        grad.clone()
    } else {
        grad.contiguous()?
    };
    Ok(Some(Prepared {
        item: i,
        grad_storage: storage_id(&grad),
        grad,
        n,
        starts,
    }))
}

/// The tensors the kernel writes for one parameter, in lock order: state slots, master, variable.
fn written<'a>(item: &Item<'a>) -> impl Iterator<Item = &'a Tensor> {
    item.state
        .iter()
        .map(|s| s.as_tensor())
        .chain(item.master.map(|m| m.as_tensor()))
        .chain([item.var.as_tensor()])
}

/// Locks the written tensors of one launch's parameters and launches `gz_<optimizer>_<sfx>`
/// (T: the gradient and model dtype).
fn run_group<T: CudaDType + 'static>(
    scalars: &Scalars,
    group: &Group,
    preps: &[Prepared],
    items: &[Item<'_>],
    sfx: &str,
) -> Result<()> {
    let tensors: Vec<&Tensor> = preps.iter().flat_map(|p| written(&items[p.item])).collect();
    lock_chain(&tensors, Vec::new(), &mut |held| {
        launch_locked::<T>(scalars, group, preps, held, sfx)
    })
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

/// The address of element `start` from a buffer's base address, after checking that
/// `start..start + n` lies inside its `len` elements of `U`.
fn element_addr<U>(base: u64, start: usize, n: usize, len: usize) -> Result<u64> {
    if start + n > len {
        return Err(err("view", format!("{start}..{} exceeds storage of {len}", start + n)));
    }
    Ok(base + (start * std::mem::size_of::<U>()) as u64)
}

/// The device address of elements `start..start + n` of a written storage, with cudarc's guard.
fn addr_mut<'a, U: CudaDType + 'static>(
    s: &'a mut CudaStorage,
    start: usize,
    n: usize,
    stream: &'a CudaStream,
) -> Result<(u64, SyncOnDrop<'a>)> {
    let slice = s.as_cuda_slice_mut::<U>()?;
    let len = slice.len();
    let (ptr, guard) = slice.device_ptr_mut(stream);
    Ok((element_addr::<U>(ptr, start, n, len)?, guard))
}

/// The device address of elements `start..start + n` of a read storage, with cudarc's guard.
fn addr<'a, U: CudaDType + 'static>(
    s: &'a CudaStorage,
    start: usize,
    n: usize,
    stream: &'a CudaStream,
) -> Result<(u64, SyncOnDrop<'a>)> {
    let slice = s.as_cuda_slice::<U>()?;
    let (ptr, guard) = slice.device_ptr(stream);
    Ok((element_addr::<U>(ptr, start, n, slice.len())?, guard))
}

/// The launch, with every written storage locked (`held`, in [`written`] order per parameter).
fn launch_locked<T: CudaDType + 'static>(
    scalars: &Scalars,
    group: &Group,
    preps: &[Prepared],
    held: &mut [&mut CudaStorage],
    sfx: &str,
) -> Result<()> {
    let slots = scalars.slots();
    let per_item: Vec<usize> = preps.iter().map(|p| p.starts.len()).collect();
    if held.len() != per_item.iter().sum::<usize>() || preps.len() != group.table.count as usize {
        candle_core::bail!(
            "fused optimizer: {} locked tensors for {} parameters",
            held.len(),
            preps.len()
        );
    }
    let Some(first) = held.first() else {
        return Ok(());
    };
    let dev = first.device.clone();
    let stream = dev.cuda_stream();
    // the gradients, read-locked until after the launch, each storage once (gradients may
    // share storage, and a second `read` of a lock on one thread can wait behind a writer)
    let mut locked: Vec<(usize, StorageRef<'_>)> = Vec::with_capacity(preps.len());
    for p in preps {
        if !locked.iter().any(|(id, _)| *id == p.grad_storage) {
            locked.push((p.grad_storage, p.grad.storage_and_layout().0));
        }
    }
    let mut table = group.table;
    let mut guards: Vec<SyncOnDrop<'_>> = Vec::with_capacity(held.len() + preps.len());
    let mut held = held.iter_mut();
    for (k, p) in preps.iter().enumerate() {
        let n = p.n;
        let layout = p.grad.layout();
        let Some((_, storage)) = locked.iter().find(|(id, _)| *id == p.grad_storage) else {
            candle_core::bail!("fused optimizer: gradient storage not locked");
        };
        let Storage::Cuda(gs) = &**storage else {
            candle_core::bail!("fused optimizer: gradient is not on CUDA");
        };
        let Some((g0, g1)) = layout.contiguous_offsets() else {
            candle_core::bail!("fused optimizer: gradient is not contiguous");
        };
        if g1 - g0 != n {
            candle_core::bail!("fused optimizer: gradient has {} elements, expected {n}", g1 - g0);
        }
        let (a, g) = addr::<T>(gs, g0, n, &stream)?;
        table.grad[k] = a;
        guards.push(g);
        let has_master = p.starts.len() == slots + 2;
        for (j, &start) in p.starts.iter().enumerate() {
            let Some(s) = held.next() else {
                candle_core::bail!("fused optimizer: fewer locked tensors than parameters need");
            };
            let is_var = j + 1 == p.starts.len();
            // the variable holds T for bf16/f16 models (then it is the model copy); everything
            // else, and an f32 model's variable (the parameter itself), holds f32
            let (a, g) = if is_var && has_master {
                addr_mut::<T>(s, start, n, &stream)?
            } else {
                addr_mut::<f32>(s, start, n, &stream)?
            };
            guards.push(g);
            match j {
                0 => table.slot0[k] = a,
                1 if slots == 2 => table.slot1[k] = a,
                _ if is_var && has_master => table.model[k] = a,
                _ => table.param[k] = a,
            }
        }
        if !has_master {
            table.model[k] = 0;
        }
    }
    let func = dev.get_or_load_custom_func(&format!("{}_{sfx}", scalars.kernel()), MODULE, PTX)?;
    let (grid_dim, block_dim) = group.grid;
    let cfg = LaunchConfig {
        grid_dim,
        block_dim,
        shared_mem_bytes: 0,
    };
    let mut b = func.builder();
    b.arg(&table);
    match scalars {
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
    // SAFETY: the argument list matches `gz_<optimizer>_<sfx>` in optim.cu (the table by value,
    // then the scalars as i32/f32); every address in the table points at n[k] elements of a
    // live, locked allocation of the right type (checked above), the written ones distinct
    // (the write locks held prove it), and the kernel touches nothing else.
    unsafe { b.launch(cfg) }.map_err(|e| err("launch", e))?;
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
    drop(guards);
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

    /// 40 parameters (two launches of the default 32, or one each, or groups of 3) give the
    /// same bits whatever the grouping, and match the generic update; a parameter without a
    /// gradient is left alone.
    #[test]
    fn fused_grouping_does_not_change_the_update() {
        let Some(dev) = cuda() else { return };
        /// Puts the default grouping back even if the test fails.
        struct Restore;
        impl Drop for Restore {
            fn drop(&mut self) {
                super::super::set_tensors_per_launch(super::super::launch::MAX_TENSORS);
            }
        }
        let _restore = Restore;
        // (final masters, launches made)
        let run = |per_launch: usize, path: UpdatePath| -> (Vec<Vec<f32>>, u64) {
            super::super::set_tensors_per_launch(per_launch);
            let before = super::LAUNCHES.load(std::sync::atomic::Ordering::Relaxed);
            let vars: Vec<(String, Var)> = (0..40)
                .map(|i| {
                    let n = 1 + (i * 977) % 3000;
                    let v: Vec<f32> = (0..n).map(|k| ((k * 31 + i * 7) % 101) as f32 / 101.0 - 0.5).collect();
                    let t = Tensor::from_vec(v, n, &dev).unwrap().to_dtype(DType::BF16).unwrap();
                    (format!("p{i:02}"), Var::from_tensor(&t).unwrap())
                })
                .collect();
            let params = Params::new(vars.clone()).unwrap();
            let mut opt = build_with(OptimizerKind::Rmsprop, params, 1e-2, &OptimParams::default(), path).unwrap();
            for s in 0..5 {
                let mut loss = Tensor::zeros((), DType::F32, &dev).unwrap();
                // p07 gets no gradient
                for (i, (_, v)) in vars.iter().enumerate().filter(|(i, _)| *i != 7) {
                    let term = (v.as_tensor() * grad_for(v, s, i))
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .sum_all()
                        .unwrap();
                    loss = (loss + term).unwrap();
                }
                opt.step(&loss.backward().unwrap()).unwrap();
            }
            let launches = super::LAUNCHES.load(std::sync::atomic::Ordering::Relaxed) - before;
            let m = opt.params().master_tensors().unwrap();
            let mut k: Vec<&String> = m.keys().collect();
            k.sort();
            let masters = k
                .iter()
                .map(|k| m[*k].flatten_all().unwrap().to_vec1().unwrap())
                .collect();
            (masters, launches)
        };
        // 39 tensors with a gradient, 5 steps: 32 + 7, 39 × 1 and 13 × 3 launches a step
        let (all, launches) = run(32, UpdatePath::Fused);
        assert_eq!(launches, 5 * 2, "launches with 32 tensors a launch");
        let (one, launches) = run(1, UpdatePath::Fused);
        assert_eq!(launches, 5 * 39, "launches with one tensor a launch");
        assert_eq!(all, one, "one tensor a launch");
        let (three, launches) = run(3, UpdatePath::Fused);
        assert_eq!(launches, 5 * 13, "launches with three tensors a launch");
        assert_eq!(all, three, "three tensors a launch");
        let (generic, launches) = run(32, UpdatePath::Generic);
        assert_eq!(launches, 0, "the generic path launches no fused kernel");
        assert_close("grouped", &all, &generic, 1e-6);
        let untouched: Vec<f32> = (0..1 + (7 * 977) % 3000)
            .map(|k| ((k * 31 + 7 * 7) % 101) as f32 / 101.0 - 0.5)
            .map(|v| half::bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(all[7], untouched, "p07 had no gradient");
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
