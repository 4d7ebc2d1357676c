//! gz-schema: the Galaxy Zoo 2 decision tree as the Kaggle challenge encodes it, and its CSV files.
//!
//! This is the domain core every other crate shares. It owns
//! - the 11 questions and 37 answers ([`QUESTIONS`], [`ANSWERS`]): Kaggle column names
//!   `Class1.1` … `Class11.6`, a human label for each answer, and the tree (which answer leads
//!   to which question);
//! - the normalisation the Kaggle labels follow (Q1 and Q6 sum to 1, every other question sums
//!   to the value of the answer that leads to it) and a checker for it ([`check_row`]);
//! - reading and writing `training_solutions_rev1.csv` and submission files ([`csv_io`]);
//! - whether the process a lock or temporary file names may still be writing it ([`process`]),
//!   the one judgement every crate that leaves such files shares.
//!
//! It knows nothing of images, tensors or models, and does no I/O beyond CSV, atomic writes and
//! reading `/proc`.

pub mod csv_io;
pub mod process;

/// `n` and a noun, in the plural unless `n` is 1 (`1 image`, `3 images`), for messages: every
/// crate says counts the same way, not `3 image(s)`. The plural adds `s`.
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

pub use csv_io::{
    compression, csv_reason, read_solutions, read_solutions_from, stage_atomic, write_atomic, write_solutions,
    LineCounter, SchemaError, Solutions, Staged,
};

/// Number of answers (output columns) in the Kaggle task.
pub const N_ANSWERS: usize = 37;
/// Number of questions in the decision tree.
pub const N_QUESTIONS: usize = 11;

/// One question of the decision tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Question {
    /// 1-based question number as in the Kaggle column names (`Class<number>.<k>`).
    pub number: u8,
    /// The question as volunteers saw it.
    pub text: &'static str,
    /// Index of its first answer in [`ANSWERS`] (answers of a question are contiguous).
    pub first: usize,
    /// Number of answers.
    pub len: usize,
    /// The answer whose value the question's answers sum to in the Kaggle labels;
    /// `None` for Q1 and Q6, which are normalised to sum to 1.
    pub parent: Option<usize>,
}

impl Question {
    /// The answer indices of this question.
    pub fn answers(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.len
    }
}

/// One answer (one output column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// Kaggle column name, e.g. `Class1.2`.
    pub column: &'static str,
    /// Human label, e.g. `features or disk`.
    pub label: &'static str,
    /// Index (0-based) of the question it answers in [`QUESTIONS`].
    pub question: usize,
    /// The question (0-based) a volunteer is asked next after giving this answer;
    /// `None` ends the classification.
    pub leads_to: Option<usize>,
}

const fn q(number: u8, text: &'static str, first: usize, len: usize, parent: Option<usize>) -> Question {
    Question {
        number,
        text,
        first,
        len,
        parent,
    }
}

const fn a(column: &'static str, label: &'static str, question: usize, leads_to: Option<usize>) -> Answer {
    Answer {
        column,
        label,
        question,
        leads_to,
    }
}

/// Answer index of `ClassQ.K` (both 1-based), usable in const context.
pub const fn answer_index(question_number: usize, k: usize) -> usize {
    QUESTIONS[question_number - 1].first + k - 1
}

/// The 11 questions of the Galaxy Zoo 2 tree, in Kaggle order.
pub const QUESTIONS: [Question; N_QUESTIONS] = [
    q(
        1,
        "Is the galaxy simply smooth and rounded, with no sign of a disk?",
        0,
        3,
        None,
    ),
    q(2, "Could this be a disk viewed edge-on?", 3, 2, Some(1)),
    q(
        3,
        "Is there a sign of a bar feature through the centre of the galaxy?",
        5,
        2,
        Some(4),
    ),
    q(4, "Is there any sign of a spiral arm pattern?", 7, 2, Some(4)),
    q(
        5,
        "How prominent is the central bulge, compared with the rest of the galaxy?",
        9,
        4,
        Some(4),
    ),
    q(6, "Is there anything odd?", 13, 2, None),
    q(7, "How rounded is it?", 15, 3, Some(0)),
    q(
        8,
        "Is the odd feature a ring, or is the galaxy disturbed or irregular?",
        18,
        7,
        Some(13),
    ),
    q(
        9,
        "Does the galaxy have a bulge at its centre? If so, what shape?",
        25,
        3,
        Some(3),
    ),
    q(10, "How tightly wound do the spiral arms appear?", 28, 3, Some(7)),
    q(11, "How many spiral arms are there?", 31, 6, Some(7)),
];

/// The 37 answers in Kaggle column order.
pub const ANSWERS: [Answer; N_ANSWERS] = [
    a("Class1.1", "smooth", 0, Some(6)),
    a("Class1.2", "features or disk", 0, Some(1)),
    a("Class1.3", "star or artifact", 0, None),
    a("Class2.1", "edge-on: yes", 1, Some(8)),
    a("Class2.2", "edge-on: no", 1, Some(2)),
    a("Class3.1", "bar: yes", 2, Some(3)),
    a("Class3.2", "bar: no", 2, Some(3)),
    a("Class4.1", "spiral: yes", 3, Some(9)),
    a("Class4.2", "spiral: no", 3, Some(4)),
    a("Class5.1", "bulge: none", 4, Some(5)),
    a("Class5.2", "bulge: just noticeable", 4, Some(5)),
    a("Class5.3", "bulge: obvious", 4, Some(5)),
    a("Class5.4", "bulge: dominant", 4, Some(5)),
    a("Class6.1", "odd: yes", 5, Some(7)),
    a("Class6.2", "odd: no", 5, None),
    a("Class7.1", "completely round", 6, Some(5)),
    a("Class7.2", "in between", 6, Some(5)),
    a("Class7.3", "cigar-shaped", 6, Some(5)),
    a("Class8.1", "ring", 7, None),
    a("Class8.2", "lens or arc", 7, None),
    a("Class8.3", "disturbed", 7, None),
    a("Class8.4", "irregular", 7, None),
    a("Class8.5", "other", 7, None),
    a("Class8.6", "merger", 7, None),
    a("Class8.7", "dust lane", 7, None),
    a("Class9.1", "bulge: rounded", 8, Some(5)),
    a("Class9.2", "bulge: boxy", 8, Some(5)),
    a("Class9.3", "bulge: none (edge-on)", 8, Some(5)),
    a("Class10.1", "arms: tight", 9, Some(10)),
    a("Class10.2", "arms: medium", 9, Some(10)),
    a("Class10.3", "arms: loose", 9, Some(10)),
    a("Class11.1", "arms: 1", 10, Some(4)),
    a("Class11.2", "arms: 2", 10, Some(4)),
    a("Class11.3", "arms: 3", 10, Some(4)),
    a("Class11.4", "arms: 4", 10, Some(4)),
    a("Class11.5", "arms: more than four", 10, Some(4)),
    a("Class11.6", "arms: can't tell", 10, Some(4)),
];

/// The Kaggle column names `Class1.1` … `Class11.6`, in order.
pub fn column_names() -> impl Iterator<Item = &'static str> {
    ANSWERS.iter().map(|a| a.column)
}

/// The CSV header line of a solutions or submission file (without newline).
pub fn csv_header() -> String {
    let mut s = String::from("GalaxyID");
    for c in column_names() {
        s.push(',');
        s.push_str(c);
    }
    s
}

/// Default tolerance for [`check_row`]: the Kaggle labels are printed with about 6 decimals.
pub const DEFAULT_TOLERANCE: f32 = 1e-3;

/// One failed normalisation equality in a label row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Violation {
    /// Question index (0-based) whose answers do not sum as they should.
    pub question: usize,
    /// What the sum should be (1, or the parent answer's value).
    pub expected: f32,
    /// The actual sum of the question's answers.
    pub actual: f32,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let q = &QUESTIONS[self.question];
        let target = match q.parent {
            None => "1".to_string(),
            Some(p) => ANSWERS[p].column.to_string(),
        };
        write!(
            f,
            "sum(Q{}) = {:.6} but should equal {} = {:.6}",
            q.number, self.actual, target, self.expected
        )
    }
}

/// The value a question's answers must sum to in a label row: 1 for Q1/Q6, else the parent answer.
pub fn question_target(row: &[f32], question: usize) -> f32 {
    match QUESTIONS[question].parent {
        None => 1.0,
        Some(p) => row[p],
    }
}

/// Below this share of volunteers reaching a question, [`conditional`] gives no fractions for
/// it: they would be the ratio of two numbers near zero.
pub const MIN_REACHED: f32 = 0.01;

/// Per-question ("conditional") fractions of one row of 37 Kaggle values, as Galaxy Zoo
/// catalogues give them: each answer's share of the votes cast on its question, so each
/// question's answers sum to 1 ("of the volunteers who were asked whether this disk has a bar,
/// 70 % said yes"). The Kaggle values are shares of all volunteers (each question's answers sum
/// to its parent answer). Values are clipped to [0, 1] first (a model's outputs may stray);
/// a question that less than [`MIN_REACHED`] of the volunteers reached gets `None`s, and a
/// question with a NaN answer (a diverged model) gets NaNs, not fractions of the others.
/// Panics if `row.len() != 37` (caller bug).
pub fn conditional(row: &[f32]) -> [Option<f32>; N_ANSWERS] {
    assert_eq!(row.len(), N_ANSWERS, "a row has {N_ANSWERS} values");
    let mut out = [None; N_ANSWERS];
    for q in &QUESTIONS {
        let clipped = |i: usize| row[i].clamp(0.0, 1.0);
        if q.answers().any(|i| row[i].is_nan()) {
            for i in q.answers() {
                out[i] = Some(f32::NAN);
            }
            continue;
        }
        let reached: f32 = q.answers().map(clipped).sum();
        if reached >= MIN_REACHED {
            for i in q.answers() {
                out[i] = Some(clipped(i) / reached);
            }
        }
    }
    out
}

/// Checks every normalisation equality of the Kaggle labels on one row of 37 values and
/// returns the ones that fail by more than `tol`. Panics if `row.len() != 37` (caller bug).
pub fn check_row(row: &[f32], tol: f32) -> Vec<Violation> {
    assert_eq!(row.len(), N_ANSWERS, "a label row has {N_ANSWERS} values");
    let mut out = Vec::new();
    for (qi, q) in QUESTIONS.iter().enumerate() {
        let actual: f32 = row[q.answers()].iter().sum();
        let expected = question_target(row, qi);
        if (actual - expected).abs() > tol || !actual.is_finite() {
            out.push(Violation {
                question: qi,
                expected,
                actual,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn conditional_fractions_sum_to_one_per_reached_question() {
        // a disk (0.8 features), mostly face-on (0.7 of all), barred for 0.49 of all
        let mut row = [0.0f32; N_ANSWERS];
        row[answer_index(1, 1)] = 0.15;
        row[answer_index(1, 2)] = 0.8;
        row[answer_index(1, 3)] = 0.05;
        row[answer_index(2, 1)] = 0.1;
        row[answer_index(2, 2)] = 0.7;
        row[answer_index(3, 1)] = 0.49;
        row[answer_index(3, 2)] = 0.21;
        row[answer_index(6, 1)] = 0.2;
        row[answer_index(6, 2)] = 0.8;
        // Q7 (roundness of smooth galaxies) reached by 0.15; Q9 (edge-on bulge) by 0.005
        row[answer_index(7, 1)] = 0.15;
        row[answer_index(9, 2)] = 0.005;
        // a model's stray output: negative, clipped to 0
        row[answer_index(7, 3)] = -0.02;
        let c = conditional(&row);
        let get = |q, k| c[answer_index(q, k)];
        assert_eq!(get(1, 2), Some(0.8));
        assert!((get(3, 1).unwrap() - 0.7).abs() < 1e-6);
        assert!((get(2, 2).unwrap() - 0.875).abs() < 1e-6);
        assert_eq!(get(7, 1), Some(1.0));
        assert_eq!(get(7, 3), Some(0.0));
        assert_eq!(get(9, 2), None, "reached by 0.5 %: no fractions");
        assert_eq!(get(11, 1), None, "never reached");
        // a NaN answer (a diverged model): its question is NaN, not a fraction of the rest;
        // an infinite one is clipped like any stray value
        let mut odd = row;
        odd[answer_index(1, 1)] = f32::NAN;
        odd[answer_index(2, 1)] = f32::INFINITY;
        let d = conditional(&odd);
        assert!(QUESTIONS[0].answers().all(|i| d[i].is_some_and(f32::is_nan)), "{d:?}");
        assert!((d[answer_index(2, 1)].unwrap() - 1.0 / 1.7).abs() < 1e-6, "{d:?}");
        assert_eq!(d[answer_index(3, 1)], get(3, 1));
        for (qi, q) in QUESTIONS.iter().enumerate() {
            let vals: Vec<f32> = q.answers().filter_map(|i| c[i]).collect();
            if !vals.is_empty() {
                assert_eq!(vals.len(), q.len, "Q{}", qi + 1);
                assert!((vals.iter().sum::<f32>() - 1.0).abs() < 1e-5, "Q{}", qi + 1);
            }
        }
    }

    use super::*;

    #[test]
    fn tree_is_consistent() {
        let mut next = 0;
        for (qi, q) in QUESTIONS.iter().enumerate() {
            assert_eq!(q.number as usize, qi + 1);
            assert_eq!(q.first, next, "answers contiguous");
            next += q.len;
            for ai in q.answers() {
                assert_eq!(ANSWERS[ai].question, qi);
                let prefix = format!("Class{}.", q.number);
                assert!(ANSWERS[ai].column.starts_with(&prefix));
            }
            if let Some(p) = q.parent {
                // every volunteer who gave the parent answer is asked this question: walking the
                // tree from the parent answer reaches it (Q5 is reached from Class2.2 via Q3, Q4)
                let mut reached = false;
                let mut next_q = ANSWERS[p].leads_to;
                let mut hops = 0;
                while let Some(nq) = next_q {
                    if nq == qi {
                        reached = true;
                        break;
                    }
                    // follow the first answer's path; questions on the way are all asked
                    next_q = ANSWERS[QUESTIONS[nq].first].leads_to;
                    hops += 1;
                    assert!(hops < N_QUESTIONS, "cycle in the tree");
                }
                assert!(
                    reached,
                    "Q{} not reached from its parent {}",
                    q.number, ANSWERS[p].column
                );
            }
        }
        assert_eq!(next, N_ANSWERS);
        assert_eq!(answer_index(11, 6), 36);
        assert_eq!(answer_index(6, 1), 13);
    }

    #[test]
    fn header_matches_kaggle() {
        let h = csv_header();
        assert!(h.starts_with("GalaxyID,Class1.1,Class1.2,Class1.3,Class2.1"));
        assert!(h.ends_with("Class11.5,Class11.6"));
        assert_eq!(h.split(',').count(), 38);
    }

    #[test]
    fn check_row_detects_violations() {
        // a smooth, completely round galaxy with nothing odd
        let mut row = [0f32; N_ANSWERS];
        row[0] = 1.0;
        row[answer_index(7, 1)] = 1.0;
        row[answer_index(6, 2)] = 1.0;
        assert!(check_row(&row, 1e-6).is_empty());
        row[answer_index(7, 1)] = 0.5;
        let v = check_row(&row, 1e-3);
        assert_eq!(v.len(), 1);
        assert_eq!(QUESTIONS[v[0].question].number, 7);
        assert!(v[0].to_string().contains("Class1.1"));
    }
}
