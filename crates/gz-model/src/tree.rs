//! The decision-tree output layer (Dieleman, Willett & Dambre 2015, section 5.3), usable by any
//! model (`--output tree`).
//!
//! The 37 Kaggle outputs are not independent: the answers of Q1 and Q6 sum to 1 and the answers
//! of every other question sum to the value of the answer that leads to it
//! ([`gz_schema::QUESTIONS`]`[q].parent`). This layer maps 37 raw outputs to values that satisfy
//! every such equality by construction: per question, a ReLU on the raw outputs, division by
//! their sum, and multiplication by the parent answer's value (already computed, since questions
//! are processed in topological order of the tree). It has no parameters.
//!
//! Dieleman divides by `sum + eps`, which breaks the equalities when all of a question's raw
//! outputs are negative (the sum is 0, not 1). We add the small epsilon to every answer instead,
//! `(relu(x_i) + eps) / (Σ relu(x_j) + k·eps)`, which sums to exactly 1 for every input, falls
//! back to the uniform split when all outputs are dead, and otherwise differs from Dieleman's
//! form by O(eps). The layer is differentiable everywhere except at the ReLU kinks.

use candle_core::{Module, Result, Tensor, D};
use gz_schema::{N_ANSWERS, N_QUESTIONS, QUESTIONS};

/// Default epsilon added to every ReLU'd answer.
pub const TREE_EPS: f64 = 1e-6;

/// The decision-tree output layer: (B, 37) raw outputs → (B, 37) normalised vote fractions.
#[derive(Debug, Clone)]
pub struct TreeOutput {
    eps: f64,
    order: Vec<usize>,
}

impl Default for TreeOutput {
    fn default() -> Self {
        Self::new()
    }
}

impl TreeOutput {
    /// The layer with [`TREE_EPS`].
    pub fn new() -> Self {
        Self::with_eps(TREE_EPS)
    }

    /// The layer with a custom per-answer epsilon (must be > 0 for the equalities to hold when
    /// a question's raw outputs are all negative).
    pub fn with_eps(eps: f64) -> Self {
        TreeOutput {
            eps,
            order: topological_order(),
        }
    }

    /// The order in which questions are computed (every parent before its children).
    pub fn order(&self) -> &[usize] {
        &self.order
    }
}

/// Questions ordered so that the question holding each question's parent answer comes first.
fn topological_order() -> Vec<usize> {
    let mut done = [false; N_QUESTIONS];
    let mut order = Vec::with_capacity(N_QUESTIONS);
    while order.len() < N_QUESTIONS {
        let before = order.len();
        for (qi, q) in QUESTIONS.iter().enumerate() {
            let ready = match q.parent {
                None => true,
                Some(p) => done[gz_schema::ANSWERS[p].question],
            };
            if !done[qi] && ready {
                done[qi] = true;
                order.push(qi);
            }
        }
        // gz-schema's own tests check the tree is a tree; a cycle is a bug in that table
        assert!(order.len() > before, "gz_schema::QUESTIONS has a cycle");
    }
    order
}

impl Module for TreeOutput {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_b, n) = x.dims2()?;
        if n != N_ANSWERS {
            candle_core::bail!(
                "tree output layer expects (batch, {N_ANSWERS}) raw outputs, got {:?}",
                x.dims()
            );
        }
        let mut per_q: Vec<Option<Tensor>> = vec![None; N_QUESTIONS];
        for &qi in &self.order {
            let q = &QUESTIONS[qi];
            let r = (x.narrow(1, q.first, q.len)?.relu()? + self.eps)?;
            let sum = r.sum_keepdim(D::Minus1)?;
            let mut v = r.broadcast_div(&sum)?;
            if let Some(p) = q.parent {
                let pq = &QUESTIONS[gz_schema::ANSWERS[p].question];
                // computed already: topological order
                let parent_vals = per_q[gz_schema::ANSWERS[p].question]
                    .as_ref()
                    .ok_or_else(|| candle_core::Error::Msg("tree order broken".into()))?;
                let pv = parent_vals.narrow(1, p - pq.first, 1)?;
                v = v.broadcast_mul(&pv)?;
            }
            per_q[qi] = Some(v);
        }
        let cols: Vec<Tensor> = per_q.into_iter().flatten().collect();
        Tensor::cat(&cols, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use rand::{Rng, SeedableRng};

    fn random_input(rng: &mut rand_chacha::ChaCha8Rng, b: usize, scale: f32) -> Vec<f32> {
        (0..b * N_ANSWERS)
            .map(|_| (rng.gen::<f32>() - 0.5) * 2.0 * scale)
            .collect()
    }

    #[test]
    fn order_is_topological() {
        let t = TreeOutput::new();
        let mut pos = [0usize; N_QUESTIONS];
        for (i, &q) in t.order().iter().enumerate() {
            pos[q] = i;
        }
        for (qi, q) in QUESTIONS.iter().enumerate() {
            if let Some(p) = q.parent {
                assert!(pos[gz_schema::ANSWERS[p].question] < pos[qi]);
            }
        }
    }

    #[test]
    fn satisfies_every_equality_on_random_inputs() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let tree = TreeOutput::new();
        for scale in [0.01f32, 1.0, 10.0, 1000.0] {
            let b = 64;
            let x = Tensor::from_vec(random_input(&mut rng, b, scale), (b, N_ANSWERS), &Device::Cpu).unwrap();
            let y = tree.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            for row in &y {
                let v = gz_schema::check_row(row, 1e-5);
                assert!(v.is_empty(), "scale {scale}: {v:?}");
                assert!(row.iter().all(|&p| (0.0..=1.0 + 1e-6).contains(&p)));
            }
        }
        // all raw outputs negative: uniform split, still normalised
        let x = Tensor::full(-1f32, (2, N_ANSWERS), &Device::Cpu).unwrap();
        for row in tree.forward(&x).unwrap().to_vec2::<f32>().unwrap() {
            assert!(gz_schema::check_row(&row, 1e-5).is_empty());
            assert!((row[0] - 1.0 / 3.0).abs() < 1e-5);
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let b = 3;
        // keep inputs away from the ReLU kink so central differences are valid
        let x0: Vec<f64> = (0..b * N_ANSWERS)
            .map(|_| {
                let m = 0.1 + rng.gen::<f64>();
                if rng.gen::<bool>() {
                    m
                } else {
                    -m * 0.5
                }
            })
            .collect();
        let w: Vec<f64> = (0..b * N_ANSWERS).map(|_| rng.gen::<f64>() - 0.5).collect();
        let wt = Tensor::from_vec(w.clone(), (b, N_ANSWERS), &dev).unwrap();
        let tree = TreeOutput::new();
        let loss = |x: &Tensor| -> Result<Tensor> { (tree.forward(x)? * &wt)?.sum_all() };

        let xv = Var::from_vec(x0.clone(), (b, N_ANSWERS), &dev).unwrap();
        let grads = loss(xv.as_tensor()).unwrap().backward().unwrap();
        let g = grads
            .get(xv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();

        let h = 1e-6;
        let f = |x: Vec<f64>| -> f64 {
            let t = Tensor::from_vec(x, (b, N_ANSWERS), &dev).unwrap();
            loss(&t).unwrap().to_scalar::<f64>().unwrap()
        };
        let mut max_err = 0f64;
        for i in 0..x0.len() {
            let mut xp = x0.clone();
            xp[i] += h;
            let mut xm = x0.clone();
            xm[i] -= h;
            let num = (f(xp) - f(xm)) / (2.0 * h);
            max_err = max_err.max((num - g[i]).abs());
        }
        assert!(max_err < 1e-6, "max |analytic - numeric| = {max_err}");
        assert_eq!(xv.dtype(), DType::F64);
    }
}
