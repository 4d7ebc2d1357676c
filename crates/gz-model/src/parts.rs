//! Data parallelism inside one training batch on the CPU: the batch is cut into a few
//! micro-batches ("parts") whose forward and backward passes run at the same time, one thread
//! each, and whose gradients are added up before the optimizer step.
//!
//! Why: the small nets (`tiny`, the default CPU recipe) have layers too small for the ops' own
//! parallelism (over the images of one convolution) to pay: a step of `tiny` at 32 px and batch
//! 16 takes about 3 ms, dozens of ops of tens of microseconds each, and a second thread made it
//! slower. Whole passes over parts of the batch keep each thread busy for a millisecond or more
//! between meetings.
//!
//! The result does not depend on the number of threads: the parts are fixed by the batch size
//! alone ([`parts_for`]), each part's loss is scaled by its share of the batch before its
//! backward pass, and the parts' gradients are added in part order. It is the same gradient as
//! the whole batch's up to the order of the sums, so a run trained in parts differs from one
//! trained whole in the last bits (`GZ_CPU_PARTS=1` in `gz` trains whole, as before).
//!
//! Not split: CUDA (one device, whose kernels fill it), models with dropout (the masks come
//! from one generator in call order, which threads would make racy), and batches under
//! [`MIN_PART`] images a part.
//!
//! The parts are rayon jobs. A worker waiting inside one part's op may run another whole part
//! before it returns; [`crate::grad_sink`] keeps one sink per backward pass open on a thread
//! (a stack), so each part's parameter gradients stay its own.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::ModuleT;
use rayon::prelude::*;

use crate::nets::Model;

/// Parts a CPU batch is cut into when it is large enough ([`parts_for`]).
pub const DEFAULT_PARTS: usize = 2;

/// Fewest images in one part.
pub const MIN_PART: usize = 4;

/// 0: [`DEFAULT_PARTS`]; else the number set by [`set_parts`].
static PARTS: AtomicUsize = AtomicUsize::new(0);

/// Sets the number of parts a CPU batch is cut into (`GZ_CPU_PARTS` in `gz`); 1 trains every
/// batch whole; 0 restores the default.
pub fn set_parts(parts: usize) {
    PARTS.store(parts, Ordering::Relaxed);
}

/// The parts setting: what [`set_parts`] set, else [`DEFAULT_PARTS`].
pub fn parts_setting() -> usize {
    match PARTS.load(Ordering::Relaxed) {
        0 => DEFAULT_PARTS,
        n => n,
    }
}

/// The number of parts a training batch of `batch` images of `model` on `device` is cut into:
/// 1 on CUDA, with dropout, or for batches too small; otherwise the setting, lowered until every
/// part has at least [`MIN_PART`] images. Depends on neither the thread count nor the machine.
pub fn parts_for(device: &Device, batch: usize, dropout: f32) -> usize {
    parts_for_setting(parts_setting(), device, batch, dropout)
}

/// [`parts_for`] with the setting given (a run's recorded one, `TrainConfig::cpu_parts`).
pub fn parts_for_setting(setting: usize, device: &Device, batch: usize, dropout: f32) -> usize {
    if !device.is_cpu() || dropout > 0.0 {
        return 1;
    }
    setting.max(1).min(batch / MIN_PART).max(1)
}

/// The row ranges of `parts` parts of a batch of `n`: sizes fixed by `n` and `parts` alone (the
/// first parts take the remainder).
pub fn ranges(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    let (base, extra) = (n / parts, n % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// One part's pass: the model's outputs in training mode, the MSE against `y` times `share`
/// (the part's fraction of the batch), and its gradients.
fn pass(model: &Model, x: &Tensor, y: &Tensor, share: Option<f64>) -> Result<(Tensor, GradStore)> {
    let out = model.forward_t(x, true)?.to_dtype(DType::F32)?;
    let loss = candle_nn::loss::mse(&out, y)?;
    let loss = match share {
        Some(s) => loss.affine(s, 0.0)?,
        None => loss,
    };
    let grads = crate::grad_sink::backward(&loss)?;
    Ok((loss.detach(), grads))
}

/// Forward, MSE loss and gradients of one training batch (`x` images, `y` labels in f32), in
/// `parts` parts (see the module docs; 1 is the whole batch in one pass). Returns the batch's
/// loss (the mean over all its rows, as one pass gives) and the gradients of `vars`, added over
/// the parts in part order; with one part, every gradient of the pass.
pub fn loss_and_grads(
    model: &Model,
    x: &Tensor,
    y: &Tensor,
    vars: &[Var],
    parts: usize,
) -> Result<(Tensor, GradStore)> {
    let n = x.dim(0)?;
    let ranges = ranges(n, parts);
    if ranges.len() <= 1 {
        return pass(model, x, y, None);
    }
    let slices = ranges
        .iter()
        .map(|r| {
            Ok((
                x.narrow(0, r.start, r.len())?,
                y.narrow(0, r.start, r.len())?,
                r.len() as f64 / n as f64,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    // rayon jobs, collected in part order (the sums below do not depend on which thread ran
    // which part)
    let results: Vec<Result<(Tensor, GradStore)>> = slices
        .par_iter()
        .map(|(xp, yp, share)| pass(model, xp, yp, Some(*share)))
        .collect();
    let mut results = results.into_iter();
    let (mut loss, mut grads) = results.next().expect("at least two parts")?;
    for r in results {
        let (l, g) = r?;
        loss = (loss + l)?;
        for v in vars {
            let t = v.as_tensor();
            if let Some(gp) = g.get(t) {
                let sum = match grads.remove(t) {
                    Some(held) => (held + gp)?,
                    None => gp.clone(),
                };
                grads.insert(t, sum);
            }
        }
    }
    Ok((loss, grads))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::checkpoint;
    use crate::config::{Arch, ModelConfig, OutputKind};

    /// The gradient of `v` in `g`, flattened.
    fn grad(g: &GradStore, v: &Var) -> Vec<f32> {
        g.get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    #[test]
    fn ranges_cover_the_batch_in_order() {
        assert_eq!(ranges(16, 2), vec![0..8, 8..16]);
        assert_eq!(ranges(10, 4), vec![0..3, 3..6, 6..8, 8..10]);
        assert_eq!(ranges(3, 1), vec![0..3]);
        assert_eq!(ranges(2, 4), vec![0..1, 1..2]);
        assert_eq!(ranges(0, 2), vec![0..0]);
    }

    #[test]
    fn parts_depend_on_the_batch_device_and_dropout_only() {
        let cpu = Device::Cpu;
        assert_eq!(parts_for(&cpu, 16, 0.0), DEFAULT_PARTS);
        assert_eq!(parts_for(&cpu, 7, 0.0), 1);
        assert_eq!(parts_for(&cpu, 8, 0.0), 2);
        assert_eq!(parts_for(&cpu, 16, 0.25), 1);
        assert_eq!(parts_for(&cpu, 3, 0.0), 1);
    }

    /// The batch's loss and gradients in parts equal the whole batch's (up to the order of the
    /// sums), for every variable, on a net with every kind of layer `tiny` has.
    #[test]
    fn parts_give_the_whole_batch_gradient() {
        let dev = Device::Cpu;
        for (output, n, parts) in [
            (OutputKind::Sigmoid, 16, 2),
            (OutputKind::Tree, 10, 3),
            (OutputKind::Sigmoid, 9, 4),
        ] {
            let cfg = ModelConfig::new(Arch::Tiny, output).with_input_size(32);
            let (model, varmap) = checkpoint::build_seeded(&cfg, 7, DType::F32, &dev).unwrap();
            let vars = varmap.all_vars();
            let x = Tensor::rand(0f32, 1.0, (n, 3, 32, 32), &dev).unwrap();
            let y = Tensor::rand(0f32, 1.0, (n, gz_schema::N_ANSWERS), &dev).unwrap();
            let (l1, g1) = loss_and_grads(&model, &x, &y, &vars, 1).unwrap();
            let (lp, gp) = loss_and_grads(&model, &x, &y, &vars, parts).unwrap();
            let (l1, lp) = (l1.to_scalar::<f32>().unwrap(), lp.to_scalar::<f32>().unwrap());
            assert!(
                (l1 - lp).abs() <= 1e-6 * l1.abs().max(1e-3),
                "loss {l1} vs {lp} ({parts} parts)"
            );
            assert_eq!(vars.len(), 12, "tiny: 4 conv and 2 dense layers, weights and biases");
            for v in &vars {
                let (a, b) = (grad(&g1, v), grad(&gp, v));
                let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                let worst = a.iter().zip(&b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(
                    worst <= 1e-4 * scale,
                    "{output:?} {parts} parts: gradient off by {worst} (scale {scale})"
                );
            }
        }
    }

    /// The parts' sum is fixed by the batch, not by scheduling: repeated runs give the same
    /// bits.
    #[test]
    fn parts_are_deterministic() {
        let dev = Device::Cpu;
        let cfg = ModelConfig::new(Arch::Tiny, OutputKind::Sigmoid).with_input_size(32);
        let (model, varmap) = checkpoint::build_seeded(&cfg, 3, DType::F32, &dev).unwrap();
        let vars = varmap.all_vars();
        let x = Tensor::rand(0f32, 1.0, (16, 3, 32, 32), &dev).unwrap();
        let y = Tensor::rand(0f32, 1.0, (16, gz_schema::N_ANSWERS), &dev).unwrap();
        let bits = |g: &GradStore| -> Vec<u32> { vars.iter().flat_map(|v| grad(g, v)).map(f32::to_bits).collect() };
        let (_, first) = loss_and_grads(&model, &x, &y, &vars, 4).unwrap();
        let first = bits(&first);
        for _ in 0..5 {
            let (_, again) = loss_and_grads(&model, &x, &y, &vars, 4).unwrap();
            assert_eq!(bits(&again), first);
        }
    }
}
