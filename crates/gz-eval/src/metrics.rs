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

/// How well the spread of a galaxy's predictions (over TTA views and ensemble members) tells
/// its error: whether the galaxies the views disagree on are the ones predicted worst.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpreadScore {
    /// TTA views per image.
    pub views: usize,
    /// Checkpoints averaged.
    pub members: usize,
    /// Mean over galaxies of each galaxy's spread: the RMS over its 37 answers of the standard
    /// deviation of its views' and members' predictions.
    #[serde(deserialize_with = "nan_from_null")]
    pub mean_spread: f64,
    /// Spearman rank correlation between each galaxy's spread and its RMSE (1: the spread
    /// orders the galaxies exactly by error; 0: it says nothing of it). NaN (`null` in JSON)
    /// when undefined: one galaxy, the same spread or error for all, or a NaN prediction.
    #[serde(deserialize_with = "nan_from_null")]
    pub rank_correlation: f64,
    /// For comparison, the same for what the prediction alone implies: each galaxy's RMS over
    /// its answers of sqrt(p (1 − p)) (p clipped to [0, 1]), large where the fractions are
    /// near one half, where volunteers disagree most. The spread is worth having where it adds
    /// to this (it costs the views).
    #[serde(deserialize_with = "nan_from_null")]
    pub fraction_rank_correlation: f64,
    /// RMSE of the quarter of the galaxies with the least spread.
    #[serde(deserialize_with = "nan_from_null")]
    pub rmse_least: f64,
    /// RMSE of the quarter with the most spread.
    #[serde(deserialize_with = "nan_from_null")]
    pub rmse_most: f64,
    /// Galaxies in each quarter.
    pub quarter: usize,
    /// The galaxies in tenths by spread, least first (fewer bins below 10 galaxies): what the
    /// report's `spread.png` draws.
    pub by_spread: Vec<SpreadBin>,
}

/// A group of galaxies of similar spread.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpreadBin {
    pub galaxies: usize,
    /// Their mean spread.
    #[serde(deserialize_with = "nan_from_null")]
    pub spread: f64,
    /// Their RMSE.
    #[serde(deserialize_with = "nan_from_null")]
    pub rmse: f64,
}

/// A score JSON wrote as `null` (serde_json's NaN) read back as NaN.
fn nan_from_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl SpreadScore {
    /// One line for people: what the spread is and what it says of the error.
    pub fn sentence(&self) -> String {
        let what = spread_subject(self.views, self.members);
        if self.mean_spread == 0.0 {
            // nothing to rank by: the quarters would only be the first and last rows
            return format!("spread of the {what} per galaxy: none, the {what} agree exactly on every galaxy");
        }
        let corr = |r: f64| {
            if r.is_finite() {
                // (+0.0: a correlation that rounds to zero is not "-0.00")
                format!("{:.2}", if r.abs() < 0.005 { 0.0 } else { r })
            } else {
                "undefined".to_string()
            }
        };
        format!(
            "spread of the {what} per galaxy: mean {:.4}; RMSE {:.5} on the quarter of galaxies with the most spread, \
             {:.5} on the quarter with the least ({} each); rank correlation of spread and error {} (of \
             the fractions' own p(1 − p) and error: {})",
            self.mean_spread,
            self.rmse_most,
            self.rmse_least,
            self.quarter,
            corr(self.rank_correlation),
            corr(self.fraction_rank_correlation)
        )
    }
}

/// What spreads: "8 TTA views", "3 checkpoints", "8 TTA views × 3 checkpoints".
pub fn spread_subject(views: usize, members: usize) -> String {
    match (views, members) {
        (v, 1) => format!("{v} TTA views"),
        (1, m) => format!("{m} checkpoints"),
        (v, m) => format!("{v} TTA views × {m} checkpoints"),
    }
}

/// The line in place of [`SpreadScore::sentence`] when fewer than [`MIN_SPREAD_ROWS`] galaxies
/// are scored (no spread is scored then; docs/evaluation.md).
pub fn spread_not_scored(views: usize, members: usize, rows: usize) -> String {
    format!(
        "spread of the {} per galaxy: not scored on {} (its quarters of most and least spread need at least \
         {MIN_SPREAD_ROWS})",
        spread_subject(views, members),
        if rows == 1 {
            "1 galaxy".to_string()
        } else {
            format!("{rows} galaxies")
        }
    )
}

/// Fewest galaxies for [`spread_score`] in a report: its quarters of most and least spread are
/// one galaxy each at 4; below that the same galaxy was both "quarters".
pub const MIN_SPREAD_ROWS: usize = 4;

/// Scores the spread (`var`: the per-answer variances of the views' and members'
/// predictions, row-major `n × 37` as `pred` and `truth`) against each galaxy's error.
pub fn spread_score(pred: &[f32], var: &[f32], truth: &[f32], views: usize, members: usize) -> Result<SpreadScore> {
    check_shapes(pred, truth)?;
    check_shapes(var, truth)?;
    let n = truth.len() / N_ANSWERS;
    if n == 0 {
        return Err(EvalError::Shape {
            what: "spread".into(),
            reason: "no rows to score".into(),
        });
    }
    let rms = |cells: &mut dyn Iterator<Item = f64>| (cells.sum::<f64>() / N_ANSWERS as f64).sqrt();
    let mut spread = Vec::with_capacity(n);
    let mut implied = Vec::with_capacity(n);
    let mut sq_err = Vec::with_capacity(n);
    for r in 0..n {
        let row = r * N_ANSWERS..(r + 1) * N_ANSWERS;
        // a variance a hair below 0 from rounding counts as 0 (a NaN stays NaN: `max` would make
        // a diverged model's spread 0)
        spread.push(rms(&mut var[row.clone()].iter().map(|&v| {
            if v < 0.0 {
                0.0
            } else {
                v as f64
            }
        })));
        implied.push(rms(&mut pred[row.clone()].iter().map(|&p| {
            let p = (p as f64).clamp(0.0, 1.0);
            p * (1.0 - p)
        })));
        let se: f64 = pred[row.clone()]
            .iter()
            .zip(&truth[row])
            .map(|(&p, &t)| (p as f64 - t as f64).powi(2))
            .sum();
        sq_err.push(se);
    }
    let row_rmse: Vec<f64> = sq_err.iter().map(|&se| (se / N_ANSWERS as f64).sqrt()).collect();
    // galaxies by spread, ties by position (a spread of 0 everywhere: the first and last rows)
    let mut order: Vec<usize> = (0..n).collect();
    // a NaN spread (a diverged prediction) goes last whatever its sign bit: `total_cmp` alone
    // puts x86's negative NaNs first, among the galaxies of least spread
    order.sort_by(|&a, &b| {
        spread[a]
            .is_nan()
            .cmp(&spread[b].is_nan())
            .then(spread[a].total_cmp(&spread[b]))
            .then(a.cmp(&b))
    });
    let quarter = (n / 4).max(1);
    let rmse_of =
        |rows: &[usize]| (rows.iter().map(|&r| sq_err[r]).sum::<f64>() / (rows.len() * N_ANSWERS) as f64).sqrt();
    Ok(SpreadScore {
        views,
        members,
        mean_spread: spread.iter().sum::<f64>() / n as f64,
        rank_correlation: spearman(&spread, &row_rmse),
        fraction_rank_correlation: spearman(&implied, &row_rmse),
        rmse_least: rmse_of(&order[..quarter]),
        rmse_most: rmse_of(&order[n - quarter..]),
        quarter,
        by_spread: {
            let bins = n.min(10);
            (0..bins)
                .map(|k| {
                    let rows = &order[k * n / bins..(k + 1) * n / bins];
                    SpreadBin {
                        galaxies: rows.len(),
                        spread: rows.iter().map(|&r| spread[r]).sum::<f64>() / rows.len() as f64,
                        rmse: rmse_of(rows),
                    }
                })
                .collect()
        },
    })
}

/// Ranks from 1, ties given their average rank.
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut out = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = rank;
        }
        i = j + 1;
    }
    out
}

/// Spearman's rank correlation (Pearson's on the ranks); NaN when either side is constant or
/// holds a NaN (which has no rank: ranked as a value, a diverged model's NaN errors and NaN
/// spreads would agree perfectly).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    if x.iter().chain(y).any(|v| v.is_nan()) {
        return f64::NAN;
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let n = rx.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in rx.iter().zip(&ry) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    sxy / (sxx * syy).sqrt()
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

    /// 25 galaxies fall into 10 groups of 2 or 3 by spread, least first, every galaxy once.
    #[test]
    fn spread_groups_cover_every_galaxy_in_order() {
        let n = 25;
        let truth = vec![0.5f32; n * N_ANSWERS];
        let pred = truth.clone();
        // spread decreasing with the row: the groups run from the last rows to the first
        let var: Vec<f32> = (0..n * N_ANSWERS)
            .map(|i| ((n - i / N_ANSWERS) as f32 * 0.01).powi(2))
            .collect();
        let s = spread_score(&pred, &var, &truth, 4, 1).unwrap();
        assert_eq!(s.by_spread.len(), 10);
        assert_eq!(s.by_spread.iter().map(|b| b.galaxies).sum::<usize>(), n);
        assert!(s.by_spread.iter().all(|b| (2..=3).contains(&b.galaxies)));
        assert!(s.by_spread.windows(2).all(|w| w[0].spread < w[1].spread));
        // the first group: the two rows of least spread (0.01, 0.02)
        assert!((s.by_spread[0].spread - 0.015).abs() < 1e-6, "{:?}", s.by_spread[0]);
        // 3 galaxies: 3 groups of one
        let s = spread_score(
            &pred[..3 * N_ANSWERS],
            &var[..3 * N_ANSWERS],
            &truth[..3 * N_ANSWERS],
            4,
            1,
        )
        .unwrap();
        assert_eq!(s.by_spread.len(), 3);
    }

    /// A galaxy whose spread is NaN (a diverged prediction, negative NaN as x86 makes it) is
    /// not among those of least spread.
    #[test]
    fn a_nan_spread_is_not_the_least() {
        let n = 4;
        let truth = vec![0.5f32; n * N_ANSWERS];
        let mut pred = truth.clone();
        let mut var = vec![0.0f32; n * N_ANSWERS];
        for r in 0..n {
            for a in 0..N_ANSWERS {
                var[r * N_ANSWERS + a] = (0.01 * (r + 1) as f32).powi(2);
                pred[r * N_ANSWERS + a] += 0.01 * (r + 1) as f32;
            }
        }
        // galaxy 0's prediction and spread are NaN with the sign bit set
        let neg_nan = f32::from_bits(f32::NAN.to_bits() | 0x8000_0000);
        assert!(neg_nan.is_nan() && neg_nan.is_sign_negative());
        pred[0] = neg_nan;
        var[0] = neg_nan;
        let s = spread_score(&pred, &var, &truth, 2, 1).unwrap();
        // least: galaxy 1 (finite), most: galaxy 0 (NaN)
        assert!((s.rmse_least - 0.02).abs() < 1e-6, "{}", s.rmse_least);
        assert!(s.rmse_most.is_nan());
        assert!(s.by_spread[0].rmse.is_finite() && s.by_spread[3].rmse.is_nan());
    }

    #[test]
    fn spearman_by_hand() {
        // monotone: 1 whatever the scale; reversed: -1
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0, 25.0, 100.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // ties take their average rank: x ranks 1, 2.5, 2.5, 4; y ranks 1, 2, 3, 4
        // Pearson of (1, 2.5, 2.5, 4) and (1, 2, 3, 4): 4.5 / sqrt(4.5 · 5)
        let want = 4.5 / (4.5f64 * 5.0).sqrt();
        assert!((spearman(&[0.0, 1.0, 1.0, 2.0], &[0.0, 1.0, 2.0, 3.0]) - want).abs() < 1e-12);
        assert!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_nan());
    }

    #[test]
    fn spread_ranks_galaxies_by_error() {
        // 8 galaxies: galaxy r is off by 0.01·(r+1) in every answer, with spread (std) 0.02·r
        // except galaxies 0 and 7 swapped in spread
        let n = 8;
        let truth = vec![0.5f32; n * N_ANSWERS];
        let mut pred = truth.clone();
        let mut var = vec![0.0f32; n * N_ANSWERS];
        let std_of = |r: usize| match r {
            0 => 0.14,
            7 => 0.0,
            r => 0.02 * r as f32,
        };
        for r in 0..n {
            for a in 0..N_ANSWERS {
                pred[r * N_ANSWERS + a] += 0.01 * (r + 1) as f32;
                var[r * N_ANSWERS + a] = std_of(r).powi(2);
            }
        }
        let s = spread_score(&pred, &var, &truth, 8, 1).unwrap();
        assert_eq!(s.quarter, 2);
        // least spread: galaxies 7 (0) and 1 (0.02), errors 0.08 and 0.02
        let want = ((0.08f64.powi(2) + 0.02f64.powi(2)) / 2.0).sqrt();
        assert!((s.rmse_least - want).abs() < 1e-6, "{} vs {want}", s.rmse_least);
        // most: galaxies 6 (0.12) and 0 (0.14), errors 0.07 and 0.01
        let want = ((0.07f64.powi(2) + 0.01f64.powi(2)) / 2.0).sqrt();
        assert!((s.rmse_most - want).abs() < 1e-6, "{} vs {want}", s.rmse_most);
        let want_mean = (0..n).map(|r| std_of(r) as f64).sum::<f64>() / n as f64;
        assert!((s.mean_spread - want_mean).abs() < 1e-6);
        // 8 galaxies: 8 bins of one, by spread: galaxy 7 (spread 0, error 0.08) first, then 1 …
        // 6, galaxy 0 (0.14, error 0.01) last
        assert_eq!(s.by_spread.len(), 8);
        assert!(s.by_spread.iter().all(|b| b.galaxies == 1));
        let order = [7, 1, 2, 3, 4, 5, 6, 0];
        for (b, &r) in s.by_spread.iter().zip(&order) {
            assert!((b.spread - std_of(r) as f64).abs() < 1e-6, "{b:?} for galaxy {r}");
            assert!((b.rmse - 0.01 * (r + 1) as f64).abs() < 1e-6, "{b:?} for galaxy {r}");
        }
        // ranks of spread (7→1, 1→2, …, 6→7, 0→8) against error ranks (r+1)
        let sp: Vec<f64> = (0..n).map(|r| std_of(r) as f64).collect();
        let er: Vec<f64> = (0..n).map(|r| r as f64).collect();
        assert!((s.rank_correlation - spearman(&sp, &er)).abs() < 1e-12);
        // rank differences ±7 for galaxies 0 and 7, 0 elsewhere: 1 − 6·98 / (8·63) = −1/6 (the two
        // galaxies swapped outweigh the six in order)
        assert!((s.rank_correlation + 1.0 / 6.0).abs() < 1e-12, "{}", s.rank_correlation);
        // p = 0.5 + 0.01 (r + 1): p (1 − p) falls as the error grows
        assert!(
            (s.fraction_rank_correlation + 1.0).abs() < 1e-12,
            "{}",
            s.fraction_rank_correlation
        );
        // a spread that follows the error exactly
        let var: Vec<f32> = (0..n * N_ANSWERS)
            .map(|i| (0.01 * (i / N_ANSWERS) as f32).powi(2))
            .collect();
        let s = spread_score(&pred, &var, &truth, 8, 1).unwrap();
        assert!((s.rank_correlation - 1.0).abs() < 1e-12);
        assert!(s.rmse_most > s.rmse_least);
        assert!(spread_score(&pred, &var[..37], &truth, 8, 1).is_err());
    }

    /// A diverged model predicts NaN: its spread says nothing of its error (not a perfect rank
    /// correlation from NaNs ranked in row order), and the score reads back from its JSON.
    #[test]
    fn nan_predictions_give_no_rank_correlation() {
        let n = 6;
        let truth = vec![0.5f32; n * N_ANSWERS];
        let pred = vec![f32::NAN; n * N_ANSWERS];
        let var = vec![f32::NAN; n * N_ANSWERS];
        let s = spread_score(&pred, &var, &truth, 8, 1).unwrap();
        assert!(s.rank_correlation.is_nan(), "{}", s.rank_correlation);
        assert!(s.fraction_rank_correlation.is_nan(), "{}", s.fraction_rank_correlation);
        assert!(spearman(&[1.0, f64::NAN, 3.0], &[1.0, 2.0, 3.0]).is_nan());
        assert!(
            s.sentence().contains("rank correlation of spread and error undefined"),
            "{}",
            s.sentence()
        );
        let json = serde_json::to_string(&s).unwrap();
        let back: SpreadScore = serde_json::from_str(&json).unwrap();
        assert!(back.rank_correlation.is_nan() && back.mean_spread.is_nan() && back.rmse_most.is_nan());
        assert_eq!(back.quarter, s.quarter);
    }

    /// The same checkpoint twice without views: every spread 0, nothing to rank by.
    #[test]
    fn no_spread_at_all_is_said_plainly() {
        let n = 3;
        let truth = vec![0.5f32; n * N_ANSWERS];
        let pred: Vec<f32> = (0..n * N_ANSWERS).map(|i| 0.1 * (i / N_ANSWERS) as f32).collect();
        let var = vec![0.0f32; n * N_ANSWERS];
        let s = spread_score(&pred, &var, &truth, 1, 2).unwrap();
        assert!(s.rank_correlation.is_nan());
        let line = s.sentence();
        assert!(
            line.contains("the 2 checkpoints agree exactly on every galaxy"),
            "{line}"
        );
        assert!(!line.contains("NaN") && !line.contains("quarter"), "{line}");
        // one galaxy: no ranking either, said without a NaN
        let s = spread_score(&pred[..N_ANSWERS], &[0.01; N_ANSWERS], &truth[..N_ANSWERS], 2, 1).unwrap();
        assert!(!s.sentence().contains("NaN"), "{}", s.sentence());
        let back: SpreadScore = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert!(back.rank_correlation.is_nan());
    }

    /// A correlation that rounds to zero from below reads 0.00, not -0.00; too few galaxies
    /// for the spread are said, in the singular for one.
    #[test]
    fn near_zero_correlations_and_too_few_galaxies_read_plainly() {
        let n = 4;
        let truth = vec![0.5f32; n * N_ANSWERS];
        let pred: Vec<f32> = (0..n * N_ANSWERS).map(|i| 0.1 * (i / N_ANSWERS) as f32).collect();
        let var: Vec<f32> = (0..n * N_ANSWERS).map(|i| 0.01 * (1 + i % 3) as f32).collect();
        let mut s = spread_score(&pred, &var, &truth, 8, 1).unwrap();
        s.rank_correlation = -0.001;
        s.fraction_rank_correlation = -0.004;
        let line = s.sentence();
        assert!(!line.contains("-0.00") && line.contains("error 0.00"), "{line}");
        s.rank_correlation = -0.006;
        assert!(s.sentence().contains("error -0.01"), "{}", s.sentence());
        assert_eq!(
            spread_not_scored(8, 1, 1),
            "spread of the 8 TTA views per galaxy: not scored on 1 galaxy (its quarters of most and least spread \
             need at least 4)"
        );
        assert!(spread_not_scored(2, 3, 2)
            .starts_with("spread of the 2 TTA views × 3 checkpoints per galaxy: not scored on 2 galaxies"));
    }

    #[test]
    fn shape_errors_are_reported() {
        let e = score(&[0.0; 37], &[0.0; 74]).unwrap_err();
        assert!(e.to_string().contains("37 predicted values and 74"), "{e}");
        assert!(score(&[0.0; 36], &[0.0; 36]).is_err());
        assert!(score(&[], &[]).unwrap().rmse.is_nan());
    }
}
