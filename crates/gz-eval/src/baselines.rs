//! Reference predictors and the Bayes floor, scored on the same rows as the model.
//!
//! The Kaggle leaderboard carried three benchmarks: all zeros (0.27160 on the real test set),
//! all ones, and the *central pixel benchmark* (0.16194), which grouped the training galaxies by
//! the colour of their central pixel and predicted each group's mean solution. Here that
//! colour is the mean RGB of the central `(2r+1)²` pixels of the cached image, quantised per
//! channel into `levels` bins whose edges are the training quantiles (so bins are evenly
//! filled whatever the brightness distribution); a colour whose bin saw no training galaxy gets
//! the global mean. The training-set mean is the constant that minimises the training RMSE.
//!
//! The *Bayes floor* is the RMSE of the noise-free vote fractions against the (noisy, finite
//! vote) labels: no predictor of the labels does better on average. Only a synthetic dataset
//! knows those fractions (`expected_training.csv` / `expected_test.csv`, or the summary in
//! `floor.json`); both files are optional and every function here works without them.
//! Neighbours: [`crate::metrics`] scores the predictions made here.

use std::collections::HashMap;
use std::path::Path;

use gz_schema::N_ANSWERS;
use half::f16;
use serde::{Deserialize, Serialize};

use crate::metrics::{score, Scores};
use crate::{EvalError, Result};

/// Mean of each answer over row-major `n × 37` labels (the training-mean baseline).
pub fn mean_row(labels: &[f32]) -> Result<[f32; N_ANSWERS]> {
    if labels.is_empty() || labels.len() % N_ANSWERS != 0 {
        return Err(EvalError::Shape {
            what: "training labels".into(),
            reason: format!("{} values is not a positive multiple of {N_ANSWERS}", labels.len()),
        });
    }
    let n = labels.len() / N_ANSWERS;
    let mut sum = [0f64; N_ANSWERS];
    for row in labels.chunks_exact(N_ANSWERS) {
        for (s, v) in sum.iter_mut().zip(row) {
            *s += f64::from(*v);
        }
    }
    Ok(sum.map(|s| (s / n as f64) as f32))
}

/// `n` copies of one row, row-major.
pub fn constant(row: &[f32; N_ANSWERS], n: usize) -> Vec<f32> {
    row.iter().copied().cycle().take(n * N_ANSWERS).collect()
}

/// Settings of the central-pixel benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CentralPixelConfig {
    /// Bins per colour channel, cut at the training quantiles (so `levels³` groups).
    pub levels: usize,
    /// Half-width of the central patch averaged (0 = the single central pixel).
    pub radius: usize,
}

impl Default for CentralPixelConfig {
    fn default() -> Self {
        Self { levels: 4, radius: 1 }
    }
}

/// Mean colour of the central `(2r+1)²` pixels of a C×H×W image (C ≥ 1; grey is repeated).
pub fn central_colour(image: &[f16], shape: [usize; 3], radius: usize) -> Result<[f32; 3]> {
    let [c, h, w] = shape;
    if c == 0 || h == 0 || w == 0 || image.len() != c * h * w {
        return Err(EvalError::Shape {
            what: "image for the central-pixel benchmark".into(),
            reason: format!("{} values for shape {c}×{h}×{w}", image.len()),
        });
    }
    let (cy, cx) = (h / 2, w / 2);
    let (y0, y1) = (cy.saturating_sub(radius), cy.saturating_add(radius).min(h - 1));
    let (x0, x1) = (cx.saturating_sub(radius), cx.saturating_add(radius).min(w - 1));
    let mut out = [0f32; 3];
    for (ch, o) in out.iter_mut().enumerate() {
        let plane = &image[ch.min(c - 1) * h * w..][..h * w];
        let mut s = 0f32;
        for y in y0..=y1 {
            for x in x0..=x1 {
                s += plane[y * w + x].to_f32();
            }
        }
        *o = s / ((y1 - y0 + 1) * (x1 - x0 + 1)) as f32;
    }
    Ok(out)
}

/// The fitted central-pixel benchmark: a mean solution per colour bin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CentralPixel {
    pub config: CentralPixelConfig,
    /// Per channel, the `levels − 1` inner bin edges (training quantiles).
    pub edges: [Vec<f32>; 3],
    /// Mean solution of each bin (`levels³` entries), `None` when no training galaxy fell in it.
    pub means: Vec<Option<Vec<f32>>>,
    /// Training galaxies per bin.
    pub counts: Vec<usize>,
    /// Global training mean, the fallback for empty bins.
    pub global: Vec<f32>,
}

/// Most bins per colour channel [`CentralPixel::fit`] takes.
pub const MAX_LEVELS: usize = 32;

impl CentralPixel {
    /// Fits the benchmark on training colours (one per galaxy) and their row-major labels.
    pub fn fit(colours: &[[f32; 3]], labels: &[f32], config: CentralPixelConfig) -> Result<Self> {
        if !(1..=MAX_LEVELS).contains(&config.levels) {
            return Err(EvalError::Setting {
                what: "central-pixel benchmark (--cp-levels)".into(),
                reason: format!(
                    "{} bins per colour channel; use 1 to {MAX_LEVELS} ({MAX_LEVELS}³ bins already leave most of them \
                     empty on the Kaggle training set)",
                    config.levels
                ),
            });
        }
        if labels.len() != colours.len() * N_ANSWERS || colours.is_empty() {
            return Err(EvalError::Shape {
                what: "central-pixel training set".into(),
                reason: format!("{} colours and {} label values", colours.len(), labels.len()),
            });
        }
        let global = mean_row(labels)?.to_vec();
        let edges: [Vec<f32>; 3] = std::array::from_fn(|ch| {
            let mut v: Vec<f32> = colours.iter().map(|c| c[ch]).collect();
            v.sort_by(f32::total_cmp);
            (1..config.levels)
                .map(|k| v[(k * v.len() / config.levels).min(v.len() - 1)])
                .collect()
        });
        let n_bins = config.levels.pow(3);
        let mut sums = vec![[0f64; N_ANSWERS]; n_bins];
        let mut counts = vec![0usize; n_bins];
        let mut me = Self {
            config,
            edges,
            means: Vec::new(),
            counts: Vec::new(),
            global,
        };
        for (colour, row) in colours.iter().zip(labels.chunks_exact(N_ANSWERS)) {
            let b = me.bin(*colour);
            counts[b] += 1;
            for (s, v) in sums[b].iter_mut().zip(row) {
                *s += f64::from(*v);
            }
        }
        me.means = sums
            .iter()
            .zip(&counts)
            .map(|(s, &n)| (n > 0).then(|| s.iter().map(|x| (x / n as f64) as f32).collect()))
            .collect();
        me.counts = counts;
        Ok(me)
    }

    /// The bin index of a colour.
    pub fn bin(&self, colour: [f32; 3]) -> usize {
        let mut b = 0;
        for (ch, edges) in self.edges.iter().enumerate() {
            // number of edges ≤ value = bin along this channel
            let k = edges.partition_point(|e| *e <= colour[ch]);
            b = b * self.config.levels + k;
        }
        b
    }

    /// The prediction for a galaxy of this central colour.
    pub fn predict(&self, colour: [f32; 3]) -> &[f32] {
        match self.means.get(self.bin(colour)) {
            Some(Some(m)) => m,
            _ => &self.global,
        }
    }

    /// Number of non-empty bins.
    pub fn occupied_bins(&self) -> usize {
        self.counts.iter().filter(|&&n| n > 0).count()
    }
}

/// Scores with a name (a model, a baseline).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamedScores {
    pub name: String,
    pub scores: Scores,
}

/// A training set as the baselines need it: central colours and labels.
#[derive(Debug, Clone, Copy)]
pub struct LabelledColours<'a> {
    pub colours: &'a [[f32; 3]],
    /// Row-major `n × 37`.
    pub labels: &'a [f32],
}

/// Scores every baseline on `eval` after fitting them on `train`: all zeros, all ones, the
/// training mean and the central-pixel benchmark, in that order.
pub fn score_baselines(
    train: LabelledColours<'_>,
    eval: LabelledColours<'_>,
    config: CentralPixelConfig,
) -> Result<Vec<NamedScores>> {
    let n = eval.colours.len();
    if eval.labels.len() != n * N_ANSWERS {
        return Err(EvalError::Shape {
            what: "evaluation set".into(),
            reason: format!("{n} colours and {} label values", eval.labels.len()),
        });
    }
    let mean = mean_row(train.labels)?;
    let cp = CentralPixel::fit(train.colours, train.labels, config)?;
    let mut central = Vec::with_capacity(n * N_ANSWERS);
    for c in eval.colours {
        central.extend_from_slice(cp.predict(*c));
    }
    let named = |name: &str, pred: &[f32]| -> Result<NamedScores> {
        Ok(NamedScores {
            name: name.to_string(),
            scores: score(pred, eval.labels)?,
        })
    };
    Ok(vec![
        named("all zeros", &constant(&[0.0; N_ANSWERS], n))?,
        named("all ones", &constant(&[1.0; N_ANSWERS], n))?,
        named("training mean", &constant(&mean, n))?,
        named("central pixel", &central)?,
    ])
}

/// The Bayes floor on some rows, and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Floor {
    pub rmse: f64,
    /// Which file gave it and over which rows.
    pub source: String,
    /// Per question, Q1 … Q11, when the noise-free fractions of the rows scored are known
    /// (not from `floor.json`, which holds the overall figure only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_question: Option<Vec<f64>>,
}

/// The Bayes floor for the labelled rows `ids`/`labels`, when the dataset in `data_dir` carries
/// noise-free fractions. Prefers `expected_training.csv`/`expected_test.csv` (exactly the rows
/// scored); without them, `floor.json` (`train_rmse` over the whole training set, or with `test`
/// (the rows are the test split's) `test_rmse` over the whole test set: a test score was shown
/// against the training set's floor). Returns
/// `Ok(None)` when the dataset has neither — the normal case for a real Kaggle download — or
/// when the files are unreadable (logged, never fatal: they are optional extras), or when the
/// expected fractions lack some of the rows scored (logged: no floor is better than another
/// set's). An error when they hold none of them: `data_dir` is another dataset than the one
/// scored.
pub fn bayes_floor(data_dir: &Path, ids: &[u64], labels: &[f32], test: bool) -> Result<Option<Floor>> {
    if labels.len() != ids.len() * N_ANSWERS {
        return Err(EvalError::Shape {
            what: "rows for the Bayes floor".into(),
            reason: format!("{} ids and {} label values", ids.len(), labels.len()),
        });
    }
    // id → (noise-free row, the file it came from)
    let mut expected: HashMap<u64, (Vec<f32>, &str)> = HashMap::new();
    // (an unreadable file may hold the rows scored: then no floor, not "another dataset")
    let mut unreadable = false;
    // the file the scored rows belong in holds rows (missing or header only: as if the set
    // had no expected fractions, so floor.json below)
    let own = if test {
        "expected_test.csv"
    } else {
        "expected_training.csv"
    };
    let mut own_present = false;
    for name in ["expected_training.csv", "expected_test.csv"] {
        let p = data_dir.join(name);
        if !p.is_file() {
            continue;
        }
        match gz_schema::read_solutions(&p) {
            Ok(sol) => {
                own_present |= name == own && !sol.is_empty();
                for i in 0..sol.len() {
                    expected.insert(sol.ids[i], (sol.row(i).to_vec(), name));
                }
            }
            Err(e) => {
                tracing::warn!("ignoring {}: {e}", p.display());
                unreadable = true;
            }
        }
    }
    let covered = ids.iter().filter(|id| expected.contains_key(id)).count();
    if !ids.is_empty() && covered == ids.len() {
        let mut pred = Vec::with_capacity(labels.len());
        // the files the scored rows came from, in the order above
        let mut files: Vec<&str> = Vec::new();
        for id in ids {
            let (row, file) = &expected[id];
            pred.extend_from_slice(row);
            if !files.contains(file) {
                files.push(file);
            }
        }
        files.sort_by_key(|f| *f != "expected_training.csv");
        let s = score(&pred, labels)?;
        return Ok(Some(Floor {
            rmse: s.rmse,
            source: format!("{} on the {} scored", files.join(" + "), rows(ids.len())),
            per_question: Some(s.per_question.iter().map(|q| q.rmse).collect()),
        }));
    }
    // none scored is in the other split's file either: the rows are of the missing file
    let of_missing_file = !ids.is_empty() && covered == 0 && !unreadable && !own_present;
    if !expected.is_empty() && !of_missing_file {
        if covered == 0 && !ids.is_empty() && !unreadable {
            return Err(EvalError::BadFile {
                path: data_dir.to_path_buf(),
                reason: format!(
                    "none of the {} scored is in its expected_training.csv / expected_test.csv: \
                     is it the dataset the cache was built from?",
                    rows(ids.len())
                ),
            });
        }
        if unreadable {
            tracing::warn!(
                "no Bayes floor: an expected-fractions file of {} could not be read (above)",
                data_dir.display()
            );
        } else {
            tracing::warn!(
                "no Bayes floor: {}'s expected fractions lack {} of the {} scored",
                data_dir.display(),
                ids.len() - covered,
                rows(ids.len())
            );
        }
        return Ok(None);
    }
    let fj = data_dir.join("floor.json");
    if fj.is_file() {
        let parsed = std::fs::read_to_string(&fj)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).map_err(|e| e.to_string()));
        match parsed {
            Ok(v) => {
                let (key, set) = if test {
                    ("test_rmse", "test")
                } else {
                    ("train_rmse", "training")
                };
                if let Some(r) = v.get(key).and_then(|x| x.as_f64()) {
                    return Ok(Some(Floor {
                        rmse: r,
                        source: format!("floor.json {key} (whole {set} set)"),
                        per_question: None,
                    }));
                }
                if v.get(key).is_some_and(|x| x.is_null()) {
                    // gz synth writes null for a split with no images: no floor, nothing wrong
                    return Ok(None);
                }
                tracing::warn!("ignoring {}: no numeric {key}", fj.display());
            }
            Err(e) => tracing::warn!("ignoring {}: {e}", fj.display()),
        }
    }
    Ok(None)
}

/// `1 row`, `N rows` (a validation hold-out of one image is common on tiny sets).
fn rows(n: usize) -> String {
    format!("{n} row{}", if n == 1 { "" } else { "s" })
}

/// The score table, one line per entry: the model(s) first, then the baselines, then the floor.
pub fn format_table(models: &[NamedScores], baselines: &[NamedScores], floor: Option<&Floor>) -> String {
    use std::fmt::Write as _;
    let width = models
        .iter()
        .chain(baselines)
        .map(|m| m.name.len())
        .chain([12])
        .max()
        .unwrap_or(12);
    let mut s = String::new();
    let _ = writeln!(s, "{:<width$}  {:>8}  {:>6}", "predictor", "RMSE", "rows");
    let _ = writeln!(s, "{:-<width$}  {:->8}  {:->6}", "", "", "");
    for m in models.iter().chain(baselines) {
        let _ = writeln!(s, "{:<width$}  {:>8.5}  {:>6}", m.name, m.scores.rmse, m.scores.rows);
    }
    if let Some(f) = floor {
        let _ = writeln!(s, "{:<width$}  {:>8.5}  ({})", "Bayes floor", f.rmse, f.source);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(colour: [f32; 3], centre: [f32; 3]) -> Vec<f16> {
        // 3×5×5 image: `colour` everywhere except the central 3×3 patch
        let mut v = Vec::new();
        for ch in 0..3 {
            for y in 0..5 {
                for x in 0..5 {
                    let inner = (1..=3).contains(&y) && (1..=3).contains(&x);
                    v.push(f16::from_f32(if inner { centre[ch] } else { colour[ch] }));
                }
            }
        }
        v
    }

    #[test]
    fn central_colour_averages_the_centre() {
        let im = img([0.0; 3], [0.25, 0.5, 1.0]);
        assert_eq!(central_colour(&im, [3, 5, 5], 1).unwrap(), [0.25, 0.5, 1.0]);
        let c2 = central_colour(&im, [3, 5, 5], 2).unwrap();
        assert!((c2[2] - 9.0 / 25.0).abs() < 1e-3);
        assert!(central_colour(&im, [3, 5, 4], 1).is_err());
    }

    #[test]
    fn baselines_on_a_tiny_set() {
        // dark galaxies are smooth (Class1.1 = 1), bright ones have features (Class1.2 = 1)
        let mut dark = [0f32; N_ANSWERS];
        dark[0] = 1.0;
        let mut bright = [0f32; N_ANSWERS];
        bright[1] = 1.0;
        let train_colours = [[0.1; 3], [0.15; 3], [0.9; 3], [0.95; 3]];
        let mut train_labels = Vec::new();
        for r in [dark, dark, bright, bright] {
            train_labels.extend_from_slice(&r);
        }
        let eval_colours = [[0.12; 3], [0.93; 3]];
        let mut eval_labels = dark.to_vec();
        eval_labels.extend_from_slice(&bright);

        let train = LabelledColours {
            colours: &train_colours,
            labels: &train_labels,
        };
        let eval = LabelledColours {
            colours: &eval_colours,
            labels: &eval_labels,
        };
        let b = score_baselines(train, eval, CentralPixelConfig { levels: 2, radius: 0 }).unwrap();
        let names: Vec<&str> = b.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["all zeros", "all ones", "training mean", "central pixel"]);
        // all zeros: one 1 per row → sqrt(2 / 74)
        assert!((b[0].scores.rmse - (2.0f64 / 74.0).sqrt()).abs() < 1e-6);
        // all ones: 36 wrong cells per row → sqrt(72 / 74)
        assert!((b[1].scores.rmse - (72.0f64 / 74.0).sqrt()).abs() < 1e-6);
        // training mean: Class1.1 = Class1.2 = 0.5 → four cells off by 0.5 → sqrt(1 / 74)
        assert!((b[2].scores.rmse - (1.0f64 / 74.0).sqrt()).abs() < 1e-6);
        // central pixel separates them exactly
        assert!(b[3].scores.rmse < 1e-9, "{}", b[3].scores.rmse);

        let cp = CentralPixel::fit(
            &train_colours,
            &train_labels,
            CentralPixelConfig { levels: 2, radius: 0 },
        )
        .unwrap();
        assert_eq!(cp.occupied_bins(), 2);
        // out-of-range bin counts are errors, not a panic or a 300 GB allocation
        for levels in [0, MAX_LEVELS + 1, 1000, usize::MAX] {
            let e = CentralPixel::fit(&train_colours, &train_labels, CentralPixelConfig { levels, radius: 0 })
                .unwrap_err()
                .to_string();
            assert!(e.contains("--cp-levels") && e.contains(&levels.to_string()), "{e}");
        }
        let huge_radius = central_colour(&[f16::from_f32(0.5); 3 * 4 * 4], [3, 4, 4], usize::MAX).unwrap();
        assert_eq!(huge_radius, [0.5; 3]);
        // a colour in an empty bin (dark red, bright green/blue) falls back to the global mean
        assert_eq!(cp.predict([0.1, 0.9, 0.9]), cp.global.as_slice());
        assert!((cp.global[0] - 0.5).abs() < 1e-6);

        let table = format_table(
            &[],
            &b,
            Some(&Floor {
                rmse: 0.01,
                source: "test".into(),
                per_question: None,
            }),
        );
        assert!(
            table.contains("central pixel") && table.contains("Bayes floor"),
            "{table}"
        );
    }

    #[test]
    fn floor_is_optional_and_read_when_present() {
        let dir = tempfile::tempdir().unwrap();
        let labels = constant(&[0.5; N_ANSWERS], 2);
        assert_eq!(bayes_floor(dir.path(), &[1, 2], &labels, false).unwrap(), None);
        std::fs::write(
            dir.path().join("floor.json"),
            r#"{"train_rmse": 0.0123, "test_rmse": 0.02}"#,
        )
        .unwrap();
        let f = bayes_floor(dir.path(), &[1, 2], &labels, false).unwrap().unwrap();
        assert!((f.rmse - 0.0123).abs() < 1e-12 && f.source.contains("floor.json"));
        // test rows: the test set's floor, named so
        let f = bayes_floor(dir.path(), &[1, 2], &labels, true).unwrap().unwrap();
        assert!((f.rmse - 0.02).abs() < 1e-12 && f.source == "floor.json test_rmse (whole test set)");
        // a set written with no training images has no training floor (null), not one of 0
        std::fs::write(
            dir.path().join("floor.json"),
            r#"{"train_rmse": null, "test_rmse": 0.02}"#,
        )
        .unwrap();
        assert_eq!(bayes_floor(dir.path(), &[1, 2], &labels, false).unwrap(), None);
        std::fs::write(
            dir.path().join("floor.json"),
            r#"{"train_rmse": 0.0123, "test_rmse": 0.02}"#,
        )
        .unwrap();
        let mut sol = gz_schema::Solutions::new();
        sol.push(1, &[0.4; N_ANSWERS]);
        sol.push(2, &[0.6; N_ANSWERS]);
        gz_schema::write_solutions(&dir.path().join("expected_training.csv"), &sol).unwrap();
        let f = bayes_floor(dir.path(), &[1, 2], &labels, false).unwrap().unwrap();
        assert!((f.rmse - 0.1).abs() < 1e-6, "{f:?}");
        // per question too (every answer is 0.1 off here), only from the expected fractions
        let q = f.per_question.as_ref().expect("per-question floor");
        assert_eq!(q.len(), gz_schema::QUESTIONS.len());
        assert!(q.iter().all(|v| (v - 0.1).abs() < 1e-6), "{q:?}");
        // rows the expected file does not all cover: no floor (floor.json is about the set the
        // expected file describes); none of them: another dataset, an error
        assert_eq!(bayes_floor(dir.path(), &[1, 3], &labels, false).unwrap(), None);
        let err = bayes_floor(dir.path(), &[8, 9], &labels, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("none of the 2 rows scored"), "{err}");
        // test rows, and the set has no expected_test.csv (or one with no rows): floor.json's,
        // as with neither file, not "another dataset"
        for header_only in [false, true] {
            if header_only {
                gz_schema::write_solutions(&dir.path().join("expected_test.csv"), &gz_schema::Solutions::new())
                    .unwrap();
            }
            let f = bayes_floor(dir.path(), &[8, 9], &labels, true).unwrap().unwrap();
            assert_eq!(
                f.source, "floor.json test_rmse (whole test set)",
                "header only: {header_only}"
            );
        }
        std::fs::remove_file(dir.path().join("expected_test.csv")).unwrap();
        // the source names the file(s) the scored rows came from, not every file read
        let mut test = gz_schema::Solutions::new();
        test.push(7, &[0.5; N_ANSWERS]);
        gz_schema::write_solutions(&dir.path().join("expected_test.csv"), &test).unwrap();
        let one = constant(&[0.5; N_ANSWERS], 1);
        let f = bayes_floor(dir.path(), &[7], &one, false).unwrap().unwrap();
        assert_eq!(f.source, "expected_test.csv on the 1 row scored");
        let f = bayes_floor(dir.path(), &[1, 2], &labels, false).unwrap().unwrap();
        assert_eq!(f.source, "expected_training.csv on the 2 rows scored");
        let three = constant(&[0.5; N_ANSWERS], 3);
        let f = bayes_floor(dir.path(), &[7, 1, 2], &three, false).unwrap().unwrap();
        assert_eq!(
            f.source,
            "expected_training.csv + expected_test.csv on the 3 rows scored"
        );
    }
}
