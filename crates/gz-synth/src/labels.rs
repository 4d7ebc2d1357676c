//! Labels: from a drawn galaxy's answer probabilities to Kaggle vote fractions.
//!
//! A [`Probs`] holds, for each of the 11 questions, the probability that a volunteer who reaches
//! that question picks each answer (derived in [`crate::galaxy`] from what was drawn only).
//! [`expected_row`] walks the Galaxy Zoo 2 tree (`gz_schema::ANSWERS[..].leads_to`) with those
//! probabilities, giving the noise-free cumulative fractions an infinite crowd would produce;
//! [`observed_row`] sends a finite number of simulated volunteers down the same tree. Both rows are
//! normalised the way the Kaggle labels are (Willett et al. 2013, Dieleman et al. 2015): Q1 sums to
//! one, every later question sums to the answer that leads to it, and Q6 ("anything odd?") is
//! renormalised to one over the volunteers who reached it (star/artefact answers end the
//! classification before Q6), with Q8 scaled by the same factor.

use gz_schema::{ANSWERS, N_ANSWERS, N_QUESTIONS, QUESTIONS};
use rand::Rng;

/// Index of Q6 ("Is there anything odd?"), normalised to 1 in the Kaggle labels.
const Q6: usize = 5;
/// Index of Q8 (the odd feature), which sums to `Class6.1`.
const Q8: usize = 7;

/// Per-question answer probabilities: `p[a]` for every answer `a`; the answers of each question
/// sum to 1.
#[derive(Debug, Clone, PartialEq)]
pub struct Probs {
    /// One probability per answer column, row-major like a label row.
    pub p: [f64; N_ANSWERS],
}

impl Probs {
    /// All zeros; fill every question with [`Probs::set`].
    pub fn new() -> Self {
        Self { p: [0.0; N_ANSWERS] }
    }

    /// Sets question `q`'s probabilities from non-negative weights (normalised here; all-zero
    /// weights become uniform).
    pub fn set(&mut self, q: usize, weights: &[f64]) {
        let qs = &QUESTIONS[q];
        assert_eq!(weights.len(), qs.len, "Q{} has {} answers", qs.number, qs.len);
        let w: Vec<f64> = weights
            .iter()
            .map(|&x| if x.is_finite() && x > 0.0 { x } else { 0.0 })
            .collect();
        let total: f64 = w.iter().sum();
        for (k, a) in qs.answers().enumerate() {
            self.p[a] = if total > 0.0 { w[k] / total } else { 1.0 / qs.len as f64 };
        }
    }

    /// The probabilities of question `q`'s answers.
    pub fn question(&self, q: usize) -> &[f64] {
        &self.p[QUESTIONS[q].answers()]
    }
}

impl Default for Probs {
    fn default() -> Self {
        Self::new()
    }
}

/// Questions in an order where every question comes after all questions leading to it
/// (computed from the tree, so it follows `gz_schema` if the tree ever changes).
pub fn topological_order() -> Vec<usize> {
    let mut indegree = [0usize; N_QUESTIONS];
    for a in &ANSWERS {
        if let Some(next) = a.leads_to {
            indegree[next] += 1;
        }
    }
    // Count edges per (question -> next) once per answer; Kahn's algorithm over answers.
    let mut order = Vec::with_capacity(N_QUESTIONS);
    let mut ready: Vec<usize> = (0..N_QUESTIONS).filter(|&q| indegree[q] == 0).collect();
    while let Some(q) = ready.pop() {
        order.push(q);
        for a in QUESTIONS[q].answers() {
            if let Some(next) = ANSWERS[a].leads_to {
                indegree[next] -= 1;
                if indegree[next] == 0 {
                    ready.push(next);
                }
            }
        }
    }
    assert_eq!(order.len(), N_QUESTIONS, "the Galaxy Zoo tree has no cycles");
    order
}

/// Turns raw per-answer masses (fraction of all volunteers giving each answer) into a Kaggle row:
/// Q6 and Q8 are divided by the mass that reached Q6. When nobody reached Q6 (every volunteer
/// called it a star or artefact) the row records "nothing odd" (`Class6.2 = 1`).
fn kaggle_normalise(mass: &[f64; N_ANSWERS]) -> [f32; N_ANSWERS] {
    let reach6: f64 = mass[QUESTIONS[Q6].answers()].iter().sum();
    let mut row = [0f32; N_ANSWERS];
    for (a, &m) in mass.iter().enumerate() {
        let q = ANSWERS[a].question;
        let v = if q == Q6 || q == Q8 {
            if reach6 > 1e-12 {
                m / reach6
            } else {
                0.0
            }
        } else {
            m
        };
        row[a] = v.clamp(0.0, 1.0) as f32;
    }
    if reach6 <= 1e-12 {
        row[QUESTIONS[Q6].first + 1] = 1.0;
    }
    row
}

/// The noise-free (infinite crowd) cumulative fractions for answer probabilities `probs`.
pub fn expected_row(probs: &Probs) -> [f32; N_ANSWERS] {
    let mut reach = [0f64; N_QUESTIONS];
    reach[0] = 1.0;
    let mut mass = [0f64; N_ANSWERS];
    for q in topological_order() {
        for a in QUESTIONS[q].answers() {
            mass[a] = reach[q] * probs.p[a];
            if let Some(next) = ANSWERS[a].leads_to {
                reach[next] += mass[a];
            }
        }
    }
    kaggle_normalise(&mass)
}

/// Samples one answer index of question `q` from `probs`.
fn pick<R: Rng>(rng: &mut R, probs: &Probs, q: usize) -> usize {
    let qs = &QUESTIONS[q];
    let u: f64 = rng.gen();
    let mut acc = 0.0;
    for a in qs.answers() {
        acc += probs.p[a];
        if u < acc {
            return a;
        }
    }
    qs.first + qs.len - 1
}

/// Fractions given by `volunteers` simulated volunteers, each walking the tree from Q1 and picking
/// answers with `probs`.
pub fn observed_row<R: Rng>(rng: &mut R, probs: &Probs, volunteers: u32) -> [f32; N_ANSWERS] {
    let mut counts = [0u32; N_ANSWERS];
    for _ in 0..volunteers {
        let mut q = Some(0usize);
        let mut steps = 0;
        while let Some(qi) = q {
            let a = pick(rng, probs, qi);
            counts[a] += 1;
            q = ANSWERS[a].leads_to;
            steps += 1;
            debug_assert!(steps <= N_QUESTIONS, "a volunteer's walk is at most 11 questions long");
        }
    }
    let n = f64::from(volunteers.max(1));
    let mut mass = [0f64; N_ANSWERS];
    for (m, c) in mass.iter_mut().zip(counts) {
        *m = f64::from(c) / n;
    }
    kaggle_normalise(&mass)
}

/// Root mean squared difference over all cells of two equally long row-major matrices
/// (the Kaggle metric); 0 for empty input.
pub fn rmse(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "rmse of equally shaped matrices");
    if a.is_empty() {
        return 0.0;
    }
    let s: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    (s / a.len() as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gz_schema::{answer_index, check_row};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn random_probs(rng: &mut ChaCha8Rng) -> Probs {
        let mut p = Probs::new();
        for (q, qs) in QUESTIONS.iter().enumerate() {
            let w: Vec<f64> = (0..qs.len).map(|_| rng.gen::<f64>().powi(3)).collect();
            p.set(q, &w);
        }
        p
    }

    #[test]
    fn order_is_topological() {
        let order = topological_order();
        let pos = |q: usize| order.iter().position(|&x| x == q).unwrap();
        for a in &ANSWERS {
            if let Some(next) = a.leads_to {
                assert!(pos(a.question) < pos(next), "Q{} before Q{}", a.question + 1, next + 1);
            }
        }
    }

    #[test]
    fn rows_pass_check_row() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for i in 0..500 {
            let p = random_probs(&mut rng);
            let e = expected_row(&p);
            assert!(
                check_row(&e, 1e-5).is_empty(),
                "expected row {i}: {:?}",
                check_row(&e, 1e-5)
            );
            let n = rng.gen_range(1..60);
            let o = observed_row(&mut rng, &p, n);
            assert!(
                check_row(&o, 1e-5).is_empty(),
                "observed row {i}: {:?}",
                check_row(&o, 1e-5)
            );
        }
    }

    #[test]
    fn everyone_a_star_is_consistent() {
        let mut p = Probs::new();
        for (q, qs) in QUESTIONS.iter().enumerate() {
            p.set(q, &vec![1.0; qs.len]);
        }
        p.set(0, &[0.0, 0.0, 1.0]);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let o = observed_row(&mut rng, &p, 30);
        assert!(check_row(&o, 1e-6).is_empty());
        assert_eq!(o[answer_index(1, 3)], 1.0);
        assert_eq!(o[answer_index(6, 2)], 1.0);
        let e = expected_row(&p);
        assert!(check_row(&e, 1e-6).is_empty());
    }

    #[test]
    fn many_volunteers_converge_to_expected() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let p = random_probs(&mut rng);
        let e = expected_row(&p);
        let o = observed_row(&mut rng, &p, 200_000);
        assert!(rmse(&e, &o) < 0.003, "rmse {}", rmse(&e, &o));
        let o40 = observed_row(&mut rng, &p, 40);
        assert!(rmse(&e, &o40) > 0.003, "40 volunteers are noisy");
    }
}
