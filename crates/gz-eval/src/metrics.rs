//! The Kaggle score and its breakdown.
//!
//! The Galaxy Zoo challenge scored a submission by the root mean squared error over every cell:
//! `sqrt( (1 / 37N) Σ_i Σ_k (p_ik − a_ik)² )`, N galaxies × 37 answers. Here the same sum is
//! split per answer (37 mean squared errors over N rows) and per question (the answers of one
//! question pooled), so the breakdown is exactly consistent with the score: the overall MSE is
//! the mean of the per-answer MSEs, and the answer-count-weighted mean of the per-question MSEs.
//! All sums are in f64. Neighbours: [`crate::baselines`] produces the predictions this scores.

use gz_schema::{N_ANSWERS, N_QUESTIONS, QUESTIONS};
use serde::{Deserialize, Serialize};

use crate::{EvalError, Result};

/// Per-column sums of squared errors over some rows: the sufficient statistic of every score.
#[derive(Debug, Clone, PartialEq)]
pub struct SquaredErrors {
    /// Number of rows summed.
    pub rows: usize,
    /// Σ over rows of (pred − truth)² for each of the 37 answers.
    pub per_answer: [f64; N_ANSWERS],
}

impl Default for SquaredErrors {
    fn default() -> Self {
        Self {
            rows: 0,
            per_answer: [0.0; N_ANSWERS],
        }
    }
}

impl SquaredErrors {
    /// Adds one row of 37 predictions against 37 true values.
    pub fn add_row(&mut self, pred: &[f32], truth: &[f32]) {
        debug_assert_eq!(pred.len(), N_ANSWERS);
        debug_assert_eq!(truth.len(), N_ANSWERS);
        for k in 0..N_ANSWERS {
            let d = f64::from(pred[k]) - f64::from(truth[k]);
            self.per_answer[k] += d * d;
        }
        self.rows += 1;
    }

    /// Accumulates row-major `n × 37` predictions against truth of the same shape.
    pub fn accumulate(&mut self, pred: &[f32], truth: &[f32]) -> Result<()> {
        check_shapes(pred, truth)?;
        for (p, t) in pred.chunks_exact(N_ANSWERS).zip(truth.chunks_exact(N_ANSWERS)) {
            self.add_row(p, t);
        }
        Ok(())
    }

    /// The scores these sums give.
    pub fn scores(&self) -> Scores {
        let n = self.rows.max(1) as f64;
        let nan_if_empty = |x: f64| if self.rows == 0 { f64::NAN } else { x };
        let per_answer_mse: Vec<f64> = self.per_answer.iter().map(|s| s / n).collect();
        let total: f64 = self.per_answer.iter().sum();
        let rmse = nan_if_empty((total / (n * N_ANSWERS as f64)).sqrt());
        let per_question = QUESTIONS
            .iter()
            .map(|q| {
                let s: f64 = self.per_answer[q.answers()].iter().sum();
                QuestionScore {
                    question: q.number,
                    rmse: nan_if_empty((s / (n * q.len as f64)).sqrt()),
                }
            })
            .collect();
        let per_answer = gz_schema::ANSWERS
            .iter()
            .zip(&per_answer_mse)
            .map(|(a, mse)| AnswerScore {
                column: a.column.to_string(),
                rmse: nan_if_empty(mse.sqrt()),
            })
            .collect();
        Scores {
            rows: self.rows,
            rmse,
            per_question,
            per_answer,
        }
    }
}

/// RMSE of one question (its answers pooled).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuestionScore {
    /// 1-based question number (`Q<n>`).
    pub question: u8,
    pub rmse: f64,
}

/// RMSE of one answer column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerScore {
    /// Kaggle column name, e.g. `Class1.1`.
    pub column: String,
    pub rmse: f64,
}

/// The Kaggle RMSE of a set of predictions, with its breakdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Rows scored.
    pub rows: usize,
    /// The Kaggle score: sqrt of the mean squared error over rows × 37 answers.
    pub rmse: f64,
    /// One entry per question, Q1 … Q11.
    pub per_question: Vec<QuestionScore>,
    /// One entry per answer, `Class1.1` … `Class11.6`.
    pub per_answer: Vec<AnswerScore>,
}

impl Scores {
    /// The overall mean squared error rebuilt from the per-question RMSEs (answer-count weighted):
    /// equals `rmse²` up to rounding. Used to check consistency.
    pub fn mse_from_questions(&self) -> f64 {
        self.per_question
            .iter()
            .zip(QUESTIONS.iter())
            .map(|(s, q)| s.rmse * s.rmse * q.len as f64)
            .sum::<f64>()
            / N_ANSWERS as f64
    }

    /// The overall mean squared error rebuilt from the per-answer RMSEs (plain mean).
    pub fn mse_from_answers(&self) -> f64 {
        self.per_answer.iter().map(|a| a.rmse * a.rmse).sum::<f64>() / N_ANSWERS as f64
    }
}

fn check_shapes(pred: &[f32], truth: &[f32]) -> Result<()> {
    if pred.len() != truth.len() || pred.len() % N_ANSWERS != 0 {
        return Err(EvalError::Shape {
            what: "predictions vs truth".into(),
            reason: format!(
                "{} predicted values and {} true values; both must be the same multiple of {N_ANSWERS}",
                pred.len(),
                truth.len()
            ),
        });
    }
    Ok(())
}

/// Scores row-major `n × 37` predictions against truth of the same shape.
pub fn score(pred: &[f32], truth: &[f32]) -> Result<Scores> {
    let mut se = SquaredErrors::default();
    se.accumulate(pred, truth)?;
    Ok(se.scores())
}

/// Just the Kaggle RMSE of row-major `n × 37` predictions.
pub fn kaggle_rmse(pred: &[f32], truth: &[f32]) -> Result<f64> {
    Ok(score(pred, truth)?.rmse)
}

/// Names of the questions as the report shows them (`Q1` … `Q11`).
pub fn question_labels() -> [String; N_QUESTIONS] {
    std::array::from_fn(|i| format!("Q{}", QUESTIONS[i].number))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_rmse() {
        // Two rows. Row 0: perfect except Class1.1 off by 0.5 and Class11.6 off by 0.3.
        // Row 1: every answer off by 0.1.
        let truth = vec![0.2f32; 2 * N_ANSWERS];
        let mut pred = truth.clone();
        pred[0] = 0.7;
        pred[36] = 0.5;
        for v in &mut pred[N_ANSWERS..] {
            *v += 0.1;
        }
        // Σ squared errors = 0.25 + 0.09 + 37·0.01 = 0.71 over 74 cells.
        let want = (0.71f64 / 74.0).sqrt();
        let s = score(&pred, &truth).unwrap();
        assert!((s.rmse - want).abs() < 1e-6, "{} vs {}", s.rmse, want);
        assert_eq!(s.rows, 2);
        // Class1.1: (0.25 + 0.01)/2 → sqrt(0.13)
        assert!((s.per_answer[0].rmse - 0.13f64.sqrt()).abs() < 1e-6);
        assert_eq!(s.per_answer[0].column, "Class1.1");
        // Q1 pools 3 answers × 2 rows: (0.25 + 3·0.01)/6
        assert!((s.per_question[0].rmse - (0.28f64 / 6.0).sqrt()).abs() < 1e-6);
        // Q11 pools 6 answers × 2 rows: (0.09 + 6·0.01)/12
        assert!((s.per_question[10].rmse - (0.15f64 / 12.0).sqrt()).abs() < 1e-6);
        // Q2 only has the 0.1 errors of row 1: sqrt(2·0.01/4)
        assert!((s.per_question[1].rmse - 0.005f64.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn breakdown_is_consistent_with_the_score() {
        // pseudo-random but deterministic values
        let n = 13;
        let mut x = 12345u64;
        let mut next = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) as f32) / (1u64 << 31) as f32
        };
        let pred: Vec<f32> = (0..n * N_ANSWERS).map(|_| next()).collect();
        let truth: Vec<f32> = (0..n * N_ANSWERS).map(|_| next()).collect();
        let s = score(&pred, &truth).unwrap();
        let mse = s.rmse * s.rmse;
        assert!(
            (s.mse_from_questions() - mse).abs() < 1e-9,
            "{} vs {mse}",
            s.mse_from_questions()
        );
        assert!((s.mse_from_answers() - mse).abs() < 1e-9);
        assert_eq!(s.per_question.len(), N_QUESTIONS);
        assert_eq!(s.per_answer.len(), N_ANSWERS);
        // accumulating in pieces gives the same sums
        let mut se = SquaredErrors::default();
        se.accumulate(&pred[..5 * N_ANSWERS], &truth[..5 * N_ANSWERS]).unwrap();
        se.accumulate(&pred[5 * N_ANSWERS..], &truth[5 * N_ANSWERS..]).unwrap();
        assert!((se.scores().rmse - s.rmse).abs() < 1e-12);
    }

    #[test]
    fn shape_errors_are_reported() {
        let e = score(&[0.0; 37], &[0.0; 74]).unwrap_err();
        assert!(e.to_string().contains("37 predicted values and 74"), "{e}");
        assert!(score(&[0.0; 36], &[0.0; 36]).is_err());
        assert!(score(&[], &[]).unwrap().rmse.is_nan());
    }
}
