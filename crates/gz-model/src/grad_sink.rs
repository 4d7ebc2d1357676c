//! Parameter gradients handed past candle's gradient store.
//!
//! Candle's backward pass accumulates every gradient an op returns into its `GradStore` as
//! `zeros_like(param)` followed by `add`: for a parameter used once, a zero-filled buffer and a
//! full read-read-write pass over it, only to copy the op's result. For Dieleman's first dense
//! layer (8,192 × 4,096 weights, 134 MB) that is about 400 MB of memory traffic per step on the
//! CPU, and on CUDA two launches per parameter.
//!
//! [`backward`] runs `loss.backward()` with a sink open on the calling thread (candle's
//! backward runs its ops' `bwd` on that thread). The custom ops with parameters (the dense
//! layer, the convolution ops) pass each parameter gradient through `divert`: while a sink is
//! open and the parameter is a variable (a leaf the optimizer updates), the gradient goes to
//! the sink and candle sees none. When the pass ends, [`backward`] puts the sink's gradients
//! into the returned store, adding where the store (or the sink, for a parameter used twice)
//! already holds one, in the order the ops produced them. The store then holds what candle's
//! own accumulation would have held, in the same dtype and shape; only the order of the
//! additions for a parameter used more than once can differ (a last-bit rounding difference).
//!
//! Outside [`backward`] (tests calling `Tensor::backward` directly, and the reference paths)
//! nothing is diverted. `set_enabled(false)` (`GZ_GRAD_SINK=0` in `gz`) turns diversion off
//! for comparisons.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// One open sink: (parameter, gradient) in the order the ops gave them.
type Sink = Vec<(Tensor, Tensor)>;

thread_local! {
    /// The open sinks of this thread, innermost last. More than one is open when a backward
    /// pass starts while another is running on the same thread: a rayon worker waiting inside
    /// one pass's op can run another whole pass (a training part, [`crate::parts`]) before it
    /// returns, so the inner pass ends first and its gradients go to its own sink.
    static SINK: RefCell<Vec<Sink>> = const { RefCell::new(Vec::new()) };
}

/// Diverts parameter gradients in [`backward`] (on by default; `false` for comparisons).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Closes the innermost sink when [`backward`] returns or unwinds, so a failed pass leaves no
/// open sink (and no gradients of a failed step) behind.
struct Open;

impl Drop for Open {
    fn drop(&mut self) {
        SINK.with(|s| s.borrow_mut().pop());
    }
}

/// `loss.backward()`, with the parameter gradients of gz's ops kept out of candle's
/// zero-fill-and-add accumulation (see the module docs). Same result as `loss.backward()`.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    if !ENABLED.load(Ordering::Relaxed) {
        return loss.backward();
    }
    SINK.with(|s| s.borrow_mut().push(Vec::new()));
    let open = Open;
    let mut grads = loss.backward()?;
    let diverted = SINK
        .with(|s| s.borrow_mut().last_mut().map(std::mem::take))
        .unwrap_or_default();
    drop(open);
    for (param, grad) in diverted {
        let sum = match grads.remove(&param) {
            Some(held) => held.add(&grad)?,
            None => grad,
        };
        grads.insert(&param, sum);
    }
    Ok(grads)
}

/// The gradient of `param` for candle to accumulate, or `None` after handing it to the open
/// sink (only for variables, and only inside [`backward`] on this thread).
pub(crate) fn divert(param: &Tensor, grad: Tensor) -> Option<Tensor> {
    if !param.is_variable() {
        return Some(grad);
    }
    SINK.with(|s| match s.borrow_mut().last_mut() {
        Some(sink) => {
            sink.push((param.clone(), grad));
            None
        }
        None => Some(grad),
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::*;

    fn rnd(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n as u64)
            .map(|i| ((i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9)) >> 40) as f32)
            .map(|z| z / (1u64 << 24) as f32 * 2.0 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn same(a: &Tensor, b: &Tensor) -> bool {
        a.dims() == b.dims()
            && a.flatten_all().unwrap().to_vec1::<f32>().unwrap() == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Two dense layers, the first weight used twice (once through the op, once through
    /// candle's matmul) and the second once: [`backward`] gives every variable the gradient
    /// `Tensor::backward` gives it, and the sink is closed afterwards.
    #[test]
    fn backward_matches_candles_accumulation() {
        let x = rnd(&[5, 7], 1);
        let w1 = Var::from_tensor(&rnd(&[6, 7], 2)).unwrap();
        let b1 = Var::from_tensor(&rnd(&[6], 3)).unwrap();
        let w2 = Var::from_tensor(&rnd(&[4, 6], 4)).unwrap();
        let b2 = Var::from_tensor(&Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap()).unwrap();
        let loss = || {
            let l1 = candle_nn::Linear::new(w1.as_tensor().clone(), Some(b1.as_tensor().clone()));
            let l2 = candle_nn::Linear::new(w2.as_tensor().clone(), Some(b2.as_tensor().clone()));
            let h = crate::ops::linear(&l1, &x).unwrap().relu().unwrap();
            let again = x.matmul(&w1.as_tensor().t().unwrap()).unwrap().sum_all().unwrap();
            let y = crate::ops::linear(&l2, &h).unwrap();
            (y.sqr().unwrap().sum_all().unwrap() + (again * 0.5).unwrap()).unwrap()
        };
        let plain = loss().backward().unwrap();
        let sunk = backward(&loss()).unwrap();
        for v in [&w1, &b1, &w2, &b2] {
            let (a, b) = (plain.get(v.as_tensor()).unwrap(), sunk.get(v.as_tensor()).unwrap());
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d <= 1e-6, "{:?}: off by {d}", v.dims());
        }
        // the single-use parameters' gradients are the op's own results, bit for bit
        assert!(same(
            plain.get(w2.as_tensor()).unwrap(),
            sunk.get(w2.as_tensor()).unwrap()
        ));
        assert!(same(
            plain.get(b2.as_tensor()).unwrap(),
            sunk.get(b2.as_tensor()).unwrap()
        ));
        SINK.with(|s| assert!(s.borrow().is_empty(), "the sink stays open"));
        // outside `backward` nothing is diverted
        assert!(divert(w2.as_tensor(), rnd(&[4, 6], 9)).is_some());
    }

    /// The CPU training graphs of the small nets (fused convolution ops, dense layers, the tree
    /// layer): one graph, differentiated by candle alone and through the sink, gives every
    /// variable the same gradient to the bit (each parameter is used once).
    #[test]
    fn nets_get_the_same_gradients() {
        use candle_core::ModuleT;
        use candle_nn::{VarBuilder, VarMap};

        use crate::config::{Arch, ModelConfig};
        for arch in [Arch::Tiny, Arch::DielemanTiny] {
            let varmap = VarMap::new();
            let cfg = ModelConfig::new(arch, arch.default_output());
            let model = crate::nets::build(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
            let x = (rnd(&[2, 3, 106, 106], 5).abs().unwrap() * 0.5).unwrap();
            let loss = model.forward_t(&x, true).unwrap().sqr().unwrap().mean_all().unwrap();
            let plain = loss.backward().unwrap();
            let sunk = backward(&loss).unwrap();
            let vars = varmap.all_vars();
            assert!(vars.len() >= 6, "{arch}: {} variables", vars.len());
            for v in &vars {
                let (a, b) = (plain.get(v.as_tensor()), sunk.get(v.as_tensor()));
                let (Some(a), Some(b)) = (a, b) else {
                    panic!("{arch}: a gradient is missing for {:?}", v.dims());
                };
                assert!(same(a, b), "{arch}: gradients differ for {:?}", v.dims());
            }
        }
    }

    /// A backward pass that starts while another's sink is open on the same thread (a rayon
    /// worker running a whole training part while it waits inside another part's op) keeps its
    /// own gradients, and leaves the outer sink as it was.
    #[test]
    fn a_pass_inside_another_keeps_its_own_gradients() {
        use candle_core::ModuleT;
        use candle_nn::{VarBuilder, VarMap};

        use crate::config::{Arch, ModelConfig};
        let varmap = VarMap::new();
        let cfg = ModelConfig::new(Arch::Tiny, Arch::Tiny.default_output()).with_input_size(32);
        let model = crate::nets::build(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
        let x = (rnd(&[2, 3, 32, 32], 5).abs().unwrap() * 0.5).unwrap();
        let loss = model.forward_t(&x, true).unwrap().sqr().unwrap().mean_all().unwrap();
        let plain = loss.backward().unwrap();
        // the outer pass's sink, with one gradient already in it
        let outer = Var::from_tensor(&rnd(&[3, 2], 1)).unwrap();
        SINK.with(|s| s.borrow_mut().push(vec![(outer.as_tensor().clone(), rnd(&[3, 2], 2))]));
        let _close = Open;
        let inner = backward(&loss).unwrap();
        for v in varmap.all_vars() {
            let (a, b) = (plain.get(v.as_tensor()).unwrap(), inner.get(v.as_tensor()));
            assert!(
                b.is_some_and(|b| same(a, b)),
                "the inner pass lost a gradient of {:?}",
                v.dims()
            );
        }
        SINK.with(|s| {
            let s = s.borrow();
            assert_eq!(s.len(), 1, "the inner sink is closed, the outer one open");
            assert_eq!(s[0].len(), 1, "the outer sink got the inner pass's gradients");
        });
    }

    /// A parameter that is not a variable (a constant weight) keeps candle's path.
    #[test]
    fn constants_are_not_diverted() {
        let w = rnd(&[3, 2], 1);
        SINK.with(|s| s.borrow_mut().push(Vec::new()));
        let _close = Open;
        assert!(divert(&w, rnd(&[3, 2], 2)).is_some());
        let v = Var::from_tensor(&w).unwrap();
        assert!(divert(v.as_tensor(), rnd(&[3, 2], 2)).is_none());
        SINK.with(|s| assert_eq!(s.borrow().last().map(Vec::len), Some(1)));
    }
}
