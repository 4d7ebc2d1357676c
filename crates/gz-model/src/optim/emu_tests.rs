//! `src/kernels/optim.cu` run on the CPU (`gz-kernel-emu`) with the launcher's scalars
//! ([`super::launch::Scalars`]) and grid, against the generic update ([`super::UpdatePath::Generic`],
//! candle's ops on the CPU): RMSprop, SGD-Nesterov and AdamW, with and without weight decay,
//! f32 models and bf16/f16 models with f32 masters, over steps with a learning-rate change.
//! The kernels claim the generic path's f32 operations in the same order; on the CPU both are
//! plain IEEE f32 without fused multiply-adds, so parameters, masters, model copies and state
//! must agree to the bit.

use candle_core::{DType, Device, Tensor, Var, WithDType};
use gz_kernel_emu::ffi::Storage;
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

/// The kernels' run; `small_grid` launches 2 blocks instead of the launcher's grid (the kernels
/// loop grid-stride, so any grid must give the same).
fn emulated<T: WithDType + Storage>(kind: OptimizerKind, hp: &OptimParams, small_grid: bool) -> Outcome {
    let f32_model = T::DTYPE == DType::F32;
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.iter().product();
            let model: Vec<T> = init(i, n).into_iter().map(|v| T::from_f64(v as f64)).collect();
            let mut param = Buf::new(&model.iter().map(|v| v.to_f64() as f32).collect::<Vec<_>>());
            let mut model = Buf::new(&model);
            let slots = Scalars::new(kind, hp, 0.0, 1).slots();
            let mut state: Vec<Buf<f32>> = (0..slots).map(|_| Buf::new(&vec![0f32; n])).collect();
            for step in 0..STEPS {
                let g = Buf::new(
                    &grad(n, step, i)
                        .into_iter()
                        .map(|v| T::from_f64(v as f64))
                        .collect::<Vec<_>>(),
                );
                let sc = Scalars::new(kind, hp, lr_at(step), step as u64 + 1);
                let (gp, pp) = (g.ptr(), param.mut_ptr());
                let mp = if f32_model {
                    std::ptr::null_mut()
                } else {
                    model.mut_ptr()
                };
                let sp: Vec<*mut f32> = state.iter_mut().map(|b| b.mut_ptr()).collect();
                let (grid, block) = launch::grid(n as u64);
                let grid = if small_grid { (2, 1, 1) } else { grid };
                let n64 = n as u64;
                // SAFETY: the kernels' argument lists; every buffer holds n values, the model
                // pointer is null for f32 models (the kernel then writes only the parameter)
                run(sc.kernel(), grid, block, || unsafe {
                    match sc {
                        Scalars::Rmsprop {
                            use_l2,
                            l2,
                            rho,
                            one_minus_rho,
                            eps,
                            lr,
                        } => T::rmsprop(n64, gp, sp[0], pp, mp, use_l2, l2, rho, one_minus_rho, eps, lr),
                        Scalars::SgdNesterov {
                            use_l2,
                            l2,
                            momentum,
                            lr,
                        } => T::sgd_nesterov(n64, gp, sp[0], pp, mp, use_l2, l2, momentum, lr),
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
                            n64,
                            gp,
                            sp[0],
                            sp[1],
                            pp,
                            mp,
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
            let param = param.values("param", true).to_vec();
            let model = if f32_model {
                param.clone()
            } else {
                model.values("model", true).iter().map(|v| v.to_f64() as f32).collect()
            };
            let state = state.iter().map(|b| b.values("state", true).to_vec()).collect();
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
    for kind in [OptimizerKind::Rmsprop, OptimizerKind::SgdNesterov, OptimizerKind::Adamw] {
        for (weight_decay, small_grid) in [(0.0, false), (0.01, false), (0.01, true)] {
            let hp = OptimParams {
                weight_decay,
                ..OptimParams::default()
            };
            let what = |d: DType| format!("{kind:?} {d:?} weight decay {weight_decay}, small grid {small_grid}");
            compare(
                &what(DType::F32),
                &emulated::<f32>(kind, &hp, small_grid),
                &generic(DType::F32, kind, &hp)?,
            );
            compare(
                &what(DType::BF16),
                &emulated::<bf16>(kind, &hp, small_grid),
                &generic(DType::BF16, kind, &hp)?,
            );
            compare(
                &what(DType::F16),
                &emulated::<f16>(kind, &hp, small_grid),
                &generic(DType::F16, kind, &hp)?,
            );
        }
    }
    Ok(())
}
