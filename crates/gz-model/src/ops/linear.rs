//! The dense layer `x·Wᵀ + b` as one custom op, used on the CPU while training ([`super::linear()`]).
//!
//! candle's `Linear` is `x.matmul(w.t())` plus a broadcast add, so its backward pass computes
//! the weight gradient as the gradient of the transposed view and then transposes it back, and
//! its autograd starts each of those two gradients from a fresh weight-sized zero tensor and adds
//! to it (one pass strided). For Dieleman's first dense layer (8,192 → 4,096, 134 MB of f32
//! weights) that backward took 425 ms per batch of 8 on this machine, against about 100 ms for
//! the three products below (`docs/benchmarks.md`). This op's backward returns `dW = dyᵀ·x`
//! directly in W's (out, in) layout, `dx = dy·W` and `db = Σ dy`, and its forward is one `gemm`
//! with the bias as the starting value; the values are candle's up to the order of the sums.
//! Batches of at most [`skinny::MAX_ROWS`] rows (small training batches on the CPU) take `skinny`'s
//! kernels for the three products instead of `gemm`: matrix–vector work that streams W once.

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor};

use crate::cpu_conv::{f32_view, matmul, Mat};
use crate::cudnn::{cpu_storage, cpu_tensor};
use crate::grad_sink;

mod skinny;

/// (x (B, in), w (out, in), b (out)) → y (B, out).
pub(super) struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "gz-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, inputs) = xl.shape().dims2()?;
        let (outputs, w_inputs) = wl.shape().dims2()?;
        let b_len = bl.shape().dims1()?;
        if w_inputs != inputs || b_len != outputs {
            candle_core::bail!(
                "gz-linear: x {:?}, w {:?}, b {:?} do not fit",
                xl.shape().dims(),
                wl.shape().dims(),
                bl.shape().dims()
            );
        }
        if let (Some(x), Some(w), Some(b)) = (f32_view(xs, xl), f32_view(ws, wl), f32_view(bs, bl)) {
            if rows <= skinny::MAX_ROWS {
                let y = skinny::forward(x, w, b, (rows, inputs, outputs));
                return Ok((CpuStorage::F32(y), Shape::from((rows, outputs))));
            }
            let mut y = vec![0f32; rows * outputs];
            for row in y.chunks_mut(outputs.max(1)) {
                row.copy_from_slice(b);
            }
            // y (rows × outputs) += x (rows × inputs) · wᵀ (inputs × outputs)
            matmul(
                (rows, outputs, inputs),
                &mut y,
                true,
                Mat::rows(x, inputs),
                Mat::transposed(w, inputs),
                rayon::current_num_threads(),
            );
            return Ok((CpuStorage::F32(y), Shape::from((rows, outputs))));
        }
        let (x, w, b) = (cpu_tensor(xs, xl)?, cpu_tensor(ws, wl)?, cpu_tensor(bs, bl)?);
        cpu_storage(&x.matmul(&w.t()?)?.broadcast_add(&b)?)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // the input's gradient only when the input is in the graph (decided before detaching)
        let needs_dx = x.track_op();
        let dy = dy.contiguous()?.detach();
        let (x, w) = (x.detach(), weight.detach());
        let db = dy.sum(0)?;
        let (dx, dw) = match skinny_grads(&x, &w, &dy, needs_dx)? {
            Some(grads) => grads,
            None => {
                let dx = if needs_dx { Some(dy.matmul(&w)?) } else { None };
                (dx, dy.t()?.matmul(&x)?)
            }
        };
        Ok((dx, grad_sink::divert(weight, dw), grad_sink::divert(bias, db)))
    }
}

/// `dx = dy·W` (when `needs_dx`) and `dW = dyᵀ·x` by [`skinny`]'s kernels, for contiguous f32
/// CPU tensors and batches of at most [`skinny::MAX_ROWS`] rows; `None` otherwise.
fn skinny_grads(x: &Tensor, w: &Tensor, dy: &Tensor, needs_dx: bool) -> Result<Option<(Option<Tensor>, Tensor)>> {
    let (rows, inputs) = x.dims2()?;
    let (outputs, w_inputs) = w.dims2()?;
    if rows > skinny::MAX_ROWS || w_inputs != inputs || dy.dims2()? != (rows, outputs) {
        return Ok(None);
    }
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (ds, dl) = dy.storage_and_layout();
    let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(ds)) = (&*xs, &*ws, &*ds) else {
        return Ok(None);
    };
    let (Some(xv), Some(wv), Some(dv)) = (f32_view(xs, xl), f32_view(ws, wl), f32_view(ds, dl)) else {
        return Ok(None);
    };
    let dims = (rows, inputs, outputs);
    let dx = needs_dx.then(|| skinny::input_grad(dv, wv, dims));
    let dw = skinny::weight_grad(xv, dv, dims);
    let dx = dx
        .map(|dx| Tensor::from_vec(dx, (rows, inputs), &Device::Cpu))
        .transpose()?;
    Ok(Some((dx, Tensor::from_vec(dw, (outputs, inputs), &Device::Cpu)?)))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Result, Tensor, Var};
    use candle_nn::Linear;

    use super::LinearOp;

    fn rnd(shape: &[usize], seed: u64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n as u64)
            .map(|i| ((i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9)) >> 40) as f32)
            .map(|z| z / (1u64 << 24) as f32 * 2.0 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    fn rel(a: &Tensor, b: &Tensor) -> Result<f32> {
        assert_eq!(a.dims(), b.dims());
        let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        Ok(d / b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0))
    }

    /// The op and `ops::linear` against candle's `x.matmul(w.t()) + b` with its autograd:
    /// output and the three gradients, on shapes from one row to wider than a gemm tile, small
    /// batches (the skinny kernels) and one above their limit (the `gemm` path).
    #[test]
    fn matches_candle_linear_values_and_gradients() -> Result<()> {
        for (k, &(rows, inputs, outputs)) in [(1, 5, 3), (8, 37, 11), (3, 300, 129), (40, 33, 9)].iter().enumerate() {
            let s = 10 * k as u64;
            let x = Var::from_tensor(&rnd(&[rows, inputs], s + 1)?)?;
            let w = Var::from_tensor(&rnd(&[outputs, inputs], s + 2)?)?;
            let b = Var::from_tensor(&rnd(&[outputs], s + 3)?)?;
            let r = rnd(&[rows, outputs], s + 4)?;
            let grads_of = |y: &Tensor| -> Result<[Tensor; 4]> {
                let g = (y * &r)?.sum_all()?.backward()?;
                let get = |t: &Var| g.get(t.as_tensor()).cloned().expect("a gradient");
                Ok([y.clone(), get(&x), get(&w), get(&b)])
            };
            let reference = grads_of(
                &x.as_tensor()
                    .matmul(&w.as_tensor().t()?)?
                    .broadcast_add(b.as_tensor())?,
            )?;
            let op = grads_of(&x.as_tensor().apply_op3(w.as_tensor(), b.as_tensor(), LinearOp)?)?;
            let layer = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
            let wrapped = grads_of(&super::super::linear(&layer, x.as_tensor())?)?;
            for (name, (a, (c, want))) in ["y", "dx", "dw", "db"]
                .iter()
                .zip(op.iter().zip(wrapped.iter().zip(&reference)))
            {
                assert!(
                    rel(a, want)? < 1e-5,
                    "{rows}×{inputs}→{outputs} {name}: op off by {}",
                    rel(a, want)?
                );
                assert!(
                    rel(c, want)? < 1e-5,
                    "{rows}×{inputs}→{outputs} {name}: linear off by {}",
                    rel(c, want)?
                );
            }
        }
        Ok(())
    }

    /// Inference (no variable anywhere): `ops::linear` runs the op without a graph, with the
    /// values of candle's `Linear`, at batches the skinny kernels take and above.
    #[test]
    fn inference_matches_candle_linear_without_a_graph() -> Result<()> {
        for (k, &(rows, inputs, outputs)) in [(1, 5, 3), (8, 300, 129), (40, 33, 9)].iter().enumerate() {
            let s = 10 * k as u64;
            let (x, w, b) = (
                rnd(&[rows, inputs], s + 1)?,
                rnd(&[outputs, inputs], s + 2)?,
                rnd(&[outputs], s + 3)?,
            );
            let layer = Linear::new(w.clone(), Some(b.clone()));
            let y = super::super::linear(&layer, &x)?;
            assert!(!y.track_op(), "{rows}×{inputs}→{outputs}: a graph was built");
            let want = candle_core::Module::forward(&layer, &x)?;
            assert!(
                rel(&y, &want)? < 1e-5,
                "{rows}×{inputs}→{outputs}: off by {}",
                rel(&y, &want)?
            );
        }
        Ok(())
    }

    /// An input outside the graph gets no gradient (none is computed); the weight's is unchanged.
    #[test]
    fn no_input_gradient_outside_the_graph() -> Result<()> {
        let x = rnd(&[4, 6], 1)?;
        let w = Var::from_tensor(&rnd(&[3, 6], 2)?)?;
        let b = Var::from_tensor(&Tensor::zeros(3, DType::F32, &Device::Cpu)?)?;
        let g = x
            .apply_op3(w.as_tensor(), b.as_tensor(), LinearOp)?
            .sum_all()?
            .backward()?;
        assert!(g.get(&x).is_none());
        let want = Tensor::ones((4, 3), DType::F32, &Device::Cpu)?.t()?.matmul(&x)?;
        assert!(rel(g.get(w.as_tensor()).expect("dw"), &want)? < 1e-6);
        Ok(())
    }

    /// Shapes that do not fit are an error, not a panic.
    #[test]
    fn mismatched_shapes_are_errors() -> Result<()> {
        let x = rnd(&[2, 5], 1)?;
        assert!(x.apply_op3(&rnd(&[3, 4], 2)?, &rnd(&[3], 3)?, LinearOp).is_err());
        assert!(x.apply_op3(&rnd(&[3, 5], 2)?, &rnd(&[4], 3)?, LinearOp).is_err());
        Ok(())
    }

    /// The dense-layer figures of `docs/benchmarks.md`: forward + backward of Dieleman's first
    /// dense layer (8,192 → 4,096) at batch 8, candle's `Linear` against this op. Run by hand:
    /// `cargo test --release -p gz-model --lib ops::linear::tests::bench_dense -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark: run by hand with --ignored --nocapture (release)"]
    fn bench_dense() -> Result<()> {
        let (rows, inputs, outputs) = (8, 8192, 4096);
        let x = Var::from_tensor(&rnd(&[rows, inputs], 1)?)?;
        let w = Var::from_tensor(&(rnd(&[outputs, inputs], 2)? * 0.01)?)?;
        let b = Var::from_tensor(&Tensor::zeros(outputs, DType::F32, &Device::Cpu)?)?;
        let r = rnd(&[rows, outputs], 3)?;
        let run = |op: bool| -> Result<f64> {
            let mut best = f64::INFINITY;
            for _ in 0..4 {
                let t = std::time::Instant::now();
                let y = if op {
                    x.as_tensor().apply_op3(w.as_tensor(), b.as_tensor(), LinearOp)?
                } else {
                    x.as_tensor()
                        .matmul(&w.as_tensor().t()?)?
                        .broadcast_add(b.as_tensor())?
                };
                let g = (y * &r)?.sum_all()?.backward()?;
                assert!(g.get(w.as_tensor()).is_some());
                best = best.min(t.elapsed().as_secs_f64());
            }
            Ok(best)
        };
        let (candle, ours) = (run(false)?, run(true)?);
        println!(
            "dense {inputs} -> {outputs}, batch {rows}, forward + backward (best of 4): candle {:.1} ms, gz-linear {:.1} ms",
            candle * 1e3,
            ours * 1e3
        );
        Ok(())
    }
}
