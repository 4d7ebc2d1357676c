//! `src/kernels/optim.cu` run on the CPU (`gz-kernel-emu`) with the launcher's scalars
//! ([`super::launch::Scalars`]), launch tables and grids ([`super::launch::groups`]: several
//! tensors a launch, one a launch, one or two blocks a tensor), against the generic update ([`super::UpdatePath::Generic`],
//! candle's ops on the CPU): RMSprop, SGD-Nesterov and AdamW, with and without weight decay,
//! f32 models and bf16/f16 models with f32 masters, over steps with a learning-rate change.
//! The kernels claim the generic path's f32 operations in the same order; on the CPU both are
//! plain IEEE f32 without fused multiply-adds, so parameters, masters, model copies and state
//! must agree to the bit.

use candle_core::{DType, Device, Tensor, Var, WithDType};
use gz_kernel_emu::ffi::{OptimTable, Storage};
use half::{bf16, f16};

use super::launch::{self, Scalars};
use super::{build_with, OptimParams, OptimizerKind, Params, UpdatePath};
use crate::testutil::emu::{run, Buf};

const SHAPES: [&[usize]; 4] = [&[7], &[3, 5], &[4, 3, 3, 3], &[1031]];
const STEPS: usize = 12;

fn init(i: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|k| (((k * 7919 + i * 104729) % 1000) as f32 / 500.0 - 1.0) * 0.3)
        .collect()
}

fn grad(n: usize, step: usize, i: usize) -> Vec<f32> {
    (0..n)
        .map(|k| {
            let x = ((k * 31 + step * 17 + i * 5) % 97) as f32 / 97.0 - 0.45;
            x * (1.0 + step as f32 * 0.1)
        })
        .collect()
}

fn lr_at(step: usize) -> f64 {
    if step >= STEPS / 2 {
        1e-3
    } else {
        3e-3
    }
}

/// Per parameter (in name order): the f32 parameter (master), the model values as f32, and
/// the state slots.
type Outcome = Vec<(Vec<f32>, Vec<f32>, Vec<Vec<f32>>)>;

fn generic(dtype: DType, kind: OptimizerKind, hp: &OptimParams) -> candle_core::Result<Outcome> {
    let dev = Device::Cpu;
    let vars: Vec<(String, Var)> = SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let t = Tensor::from_vec(init(i, s.iter().product()), *s, &dev)?.to_dtype(dtype)?;
            Ok((format!("p{i}"), Var::from_tensor(&t)?))
        })
        .collect::<candle_core::Result<_>>()?;
    let mut opt = build_with(kind, Params::new(vars.clone())?, lr_at(0), hp, UpdatePath::Generic)?;
    for s in 0..STEPS {
        opt.set_learning_rate(lr_at(s));
        let mut loss = Tensor::zeros((), DType::F32, &dev)?;
        for (i, (_, v)) in vars.iter().enumerate() {
            let g = Tensor::from_vec(grad(v.elem_count(), s, i), v.shape(), &dev)?.to_dtype(dtype)?;
            loss = (loss + (v.as_tensor() * g)?.to_dtype(DType::F32)?.sum_all()?)?;
        }
        opt.step(&loss.backward()?)?;
    }
    let flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
    let masters = opt.params().master_tensors()?;
    let state = opt.state();
    let slots: &[&str] = match kind {
        OptimizerKind::Rmsprop => &["ms"],
        OptimizerKind::SgdNesterov => &["velocity"],
        OptimizerKind::Adamw => &["m", "v"],
    };
    vars.iter()
        .map(|(name, v)| {
            let st = slots
                .iter()
                .map(|s| flat(&state[&format!("{name}.{s}")]))
                .collect::<candle_core::Result<_>>()?;
            Ok((flat(&masters[name])?, flat(v.as_tensor())?, st))
        })
        .collect()
}

/// The emulator's copy of a launch table (the same `#[repr(C)]` layout, field by field).
fn ffi_table(t: &launch::Table) -> OptimTable {
    OptimTable {
        count: t.count,
        block_start: t.block_start,
        n: t.n,
        grad: t.grad,
        slot0: t.slot0,
        slot1: t.slot1,
        param: t.param,
        model: t.model,
    }
}

/// The kernels' run: every step updates all parameters in launches of at most `per_launch`
/// tensors ([`launch::groups`], as the CUDA launcher); `blocks_cap` limits the blocks per tensor
/// (1 or 2 make the stride loops step; `None` is the launcher's own grid).
fn emulated<T: WithDType + Storage>(
    kind: OptimizerKind,
    hp: &OptimParams,
    per_launch: usize,
    blocks_cap: Option<u64>,
) -> Outcome {
    let f32_model = T::DTYPE == DType::F32;
    let ns: Vec<usize> = SHAPES.iter().map(|s| s.iter().product()).collect();
    let ns64: Vec<u64> = ns.iter().map(|&n| n as u64).collect();
    let slots = Scalars::new(kind, hp, 0.0, 1).slots();
    let mut models: Vec<Buf<T>> = Vec::new();
    let mut params: Vec<Buf<f32>> = Vec::new();
    let mut states: Vec<Vec<Buf<f32>>> = Vec::new();
    for (i, &n) in ns.iter().enumerate() {
        let model: Vec<T> = init(i, n).into_iter().map(|v| T::from_f64(v as f64)).collect();
        params.push(Buf::new(&model.iter().map(|v| v.to_f64() as f32).collect::<Vec<_>>()));
        models.push(Buf::new(&model));
        states.push((0..slots).map(|_| Buf::new(&vec![0f32; n])).collect());
    }
    for step in 0..STEPS {
        let grads: Vec<Buf<T>> = ns
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                Buf::new(
                    &grad(n, step, i)
                        .into_iter()
                        .map(|v| T::from_f64(v as f64))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let sc = Scalars::new(kind, hp, lr_at(step), step as u64 + 1);
        for group in launch::groups(&ns64, per_launch, blocks_cap) {
            let mut t = ffi_table(&group.table);
            for (k, i) in group.tensors.clone().enumerate() {
                t.grad[k] = grads[i].ptr() as u64;
                t.slot0[k] = states[i][0].mut_ptr() as u64;
                if slots == 2 {
                    t.slot1[k] = states[i][1].mut_ptr() as u64;
                }
                t.param[k] = params[i].mut_ptr() as u64;
                // null for f32 models: the kernel then writes only the parameter
                t.model[k] = if f32_model { 0 } else { models[i].mut_ptr() as u64 };
            }
            let (grid, block) = group.grid;
            // SAFETY: the kernels' argument lists; the table's buffers hold n[k] values each
            run(sc.kernel(), grid, block, || unsafe {
                match sc {
                    Scalars::Rmsprop {
                        use_l2,
                        l2,
                        rho,
                        one_minus_rho,
                        eps,
                        lr,
                    } => T::rmsprop(t, use_l2, l2, rho, one_minus_rho, eps, lr),
                    Scalars::SgdNesterov {
                        use_l2,
                        l2,
                        momentum,
                        lr,
                    } => T::sgd_nesterov(t, use_l2, l2, momentum, lr),
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
                    } => T::adamw(
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
                    ),
                }
            });
        }
    }
    (0..ns.len())
        .map(|i| {
            let param = params[i].values("param", true).to_vec();
            let model = if f32_model {
                param.clone()
            } else {
                models[i]
                    .values("model", true)
                    .iter()
                    .map(|v| v.to_f64() as f32)
                    .collect()
            };
            let state = states[i].iter().map(|b| b.values("state", true).to_vec()).collect();
            (param, model, state)
        })
        .collect()
}

fn compare(what: &str, a: &Outcome, b: &Outcome) {
    for (i, ((pa, ma, sa), (pb, mb, sb))) in a.iter().zip(b).enumerate() {
        let mut pairs = vec![("param", pa, pb), ("model", ma, mb)];
        pairs.extend(sa.iter().zip(sb).map(|(x, y)| ("state", x, y)));
        for (name, x, y) in pairs {
            if let Some(k) = x.iter().zip(y.iter()).position(|(u, v)| u != v) {
                panic!("{what}: p{i} {name}[{k}]: kernel {} vs generic {}", x[k], y[k]);
            }
        }
    }
}

#[test]
fn optimizer_kernels_match_the_generic_update_to_the_bit() -> candle_core::Result<()> {
    // (weight decay, tensors per launch, blocks per tensor): all four tensors in one launch with
    // the launcher's grid, one tensor per launch, and 3 + 1 with one or two blocks per tensor
    // (the stride loops step, and block ranges of different tensors meet at every block)
    for kind in [OptimizerKind::Rmsprop, OptimizerKind::SgdNesterov, OptimizerKind::Adamw] {
        for (weight_decay, per_launch, cap) in [
            (0.0, launch::MAX_TENSORS, None),
            (0.01, 1, None),
            (0.01, 3, Some(1)),
            (0.0, 3, Some(2)),
        ] {
            let hp = OptimParams {
                weight_decay,
                ..OptimParams::default()
            };
            let what = |d: DType| {
                format!("{kind:?} {d:?} weight decay {weight_decay}, {per_launch} tensors a launch, cap {cap:?}")
            };
            compare(
                &what(DType::F32),
                &emulated::<f32>(kind, &hp, per_launch, cap),
                &generic(DType::F32, kind, &hp)?,
            );
            compare(
                &what(DType::BF16),
                &emulated::<bf16>(kind, &hp, per_launch, cap),
                &generic(DType::BF16, kind, &hp)?,
            );
            compare(
                &what(DType::F16),
                &emulated::<f16>(kind, &hp, per_launch, cap),
                &generic(DType::F16, kind, &hp)?,
            );
        }
    }
    Ok(())
}

/// The launch plan: tensors in order, none skipped or repeated, at most the asked number per
/// launch, every tensor at least one block and contiguous block ranges.
#[test]
fn launch_groups_cover_every_tensor_once() {
    let ns: Vec<u64> = (1..=70).map(|k| k * k * 37).collect();
    for per in [0, 1, 5, 32, 100] {
        let groups = launch::groups(&ns, per, None);
        let mut next = 0;
        for g in &groups {
            let t = &g.table;
            assert_eq!(g.tensors.start, next);
            assert!(g.tensors.len() <= per.clamp(1, launch::MAX_TENSORS));
            assert_eq!(t.count as usize, g.tensors.len());
            for (k, i) in g.tensors.clone().enumerate() {
                assert_eq!(t.n[k], ns[i]);
                assert!(t.block_start[k + 1] > t.block_start[k]);
            }
            assert_eq!(t.block_start[0], 0);
            assert_eq!(g.grid.0 .0, t.block_start[g.tensors.len()]);
            next = g.tensors.end;
        }
        assert_eq!(next, ns.len());
    }
}
