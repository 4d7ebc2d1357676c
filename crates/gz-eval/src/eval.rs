//! Scoring checkpoints: loading runs, checking they fit the data, and the score table.
//!
//! [`load_runs`] loads one or several checkpoints (gz-model's `LoadedModel`) and refuses a mix
//! of models trained on different preprocessing, or one whose preprocessing differs from the
//! cache it is asked to read ([`check_cache`] names both configs). [`validation_rows`] re-derives
//! the trainer's hold-out with the trainer's own function (`gz_model::data::holdout`, same seed,
//! fraction and subset as the run's `TrainConfig`), so `gz eval` scores exactly the images the
//! trainer validated on. [`evaluate`] predicts those rows (with TTA), fits the baselines on the
//! training rows, scores everything on the same rows, and returns an [`EvalReport`] — the
//! content of `metrics.json`. Neighbours: [`crate::predict`] runs the model,
//! [`crate::baselines`] and [`crate::metrics`] score, [`crate::report`] draws.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use gz_model::checkpoint::LoadedModel;
use gz_schema::N_ANSWERS;
use gz_shards::{Cache, Split};
use serde::{Deserialize, Serialize};

use crate::baselines::{
    bayes_floor, central_colour, score_baselines, CentralPixelConfig, Floor, LabelledColours, NamedScores,
};
use crate::metrics::{score, spread_score, SpreadScore};
use crate::predict::predict_split;
use crate::tta::{Predictor, TtaConfig};
use crate::{EvalError, Result};

impl Predictor for LoadedModel {
    fn predict(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        LoadedModel::predict(self, images)
    }
}

/// Loads every checkpoint (run directory or `.safetensors`) on `device`. All must share one
/// preprocessing config and input shape, else the ensemble would mix incompatible inputs (one
/// cache holds one preprocessing; for JPEGs see [`load_checkpoints`]).
pub fn load_runs(paths: &[PathBuf], device: &Device) -> Result<Vec<LoadedModel>> {
    let out = load_checkpoints(paths, device)?;
    let a = out[0].sidecar();
    for (p, m) in paths.iter().zip(&out).skip(1) {
        let b = m.sidecar();
        if !same_input(a, b) {
            return Err(EvalError::BadFile {
                path: p.clone(),
                reason: format!(
                    "cannot ensemble with {} on one cache: preprocessing {} (input {:?}) vs {} (input {:?}); \
                     `gz predict --images DIR` prepares the JPEGs for each",
                    paths[0].display(),
                    b.prep_config_hash,
                    b.input_shape,
                    a.prep_config_hash,
                    a.input_shape
                ),
            });
        }
    }
    Ok(out)
}

/// Whether two checkpoints take the same input: preprocessing config and input shape.
pub fn same_input(a: &gz_model::checkpoint::Sidecar, b: &gz_model::checkpoint::Sidecar) -> bool {
    a.prep_config_hash == b.prep_config_hash && a.input_shape == b.input_shape
}

/// Loads every checkpoint on `device`, whatever its preprocessing (at least one).
pub fn load_checkpoints(paths: &[PathBuf], device: &Device) -> Result<Vec<LoadedModel>> {
    if paths.is_empty() {
        return Err(EvalError::BadFile {
            path: PathBuf::from("--run"),
            reason: "no checkpoint given".into(),
        });
    }
    paths
        .iter()
        .map(|p| {
            let m = LoadedModel::load(p, device).map_err(|e| EvalError::BadFile {
                path: p.clone(),
                reason: format!("cannot load checkpoint: {e}"),
            })?;
            // a run cut short (killed, or still training) loads and scores like a finished
            // one: said, so that its numbers are not taken for the finished run's
            let run = if p.is_dir() {
                Some(p.as_path())
            } else {
                // a run's best checkpoint named by its file (the folder `.` when bare)
                p.parent()
                    .filter(|_| {
                        p.file_name()
                            .is_some_and(|n| n == "best.safetensors" || n == "best.json")
                    })
                    .map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d })
            };
            if let Some(why) = run.and_then(gz_model::train::unfinished_run) {
                tracing::warn!("{why}");
            }
            Ok(m)
        })
        .collect()
}

/// Refuses a checkpoint whose preprocessing config is not the cache's, naming both.
pub fn check_cache(model: &LoadedModel, run: &Path, cache: &Cache) -> Result<()> {
    let s = model.sidecar();
    if s.prep_config_hash != cache.config_hash() {
        return Err(EvalError::BadFile {
            path: run.to_path_buf(),
            reason: format!(
                "this checkpoint was trained on preprocessing {} ({}) but the cache {} holds preprocessing {} ({}); \
                 re-run `gz prep` with the checkpoint's settings or pass the matching cache",
                s.prep_config_hash,
                s.prep_config,
                cache.dir().display(),
                cache.config_hash(),
                cache.prep_config()
            ),
        });
    }
    Ok(())
}

/// Refuses to score a run's validation hold-out on a cache whose training split is not the one
/// it was trained on (other images, ids or labels, by content fingerprint): the re-derived
/// hold-out would then be other rows, training images among them. Runs from before the
/// fingerprint (sidecars without one) are not checked.
pub fn check_training_data(model: &LoadedModel, run: &Path, cache: &Cache) -> Result<()> {
    let s = model.sidecar();
    let (Some(was), now) = (&s.train_fingerprint, cache.split_fingerprint("train")) else {
        return Ok(());
    };
    if now.as_deref() != Some(was.as_str()) {
        return Err(EvalError::BadFile {
            path: run.to_path_buf(),
            reason: format!(
                "this run was trained on a training split with fingerprint {was}{}, but the training split of {} is \
                 {}: its validation hold-out would be other rows (training images among them); pass the cache the \
                 run was trained on",
                s.cache_dir
                    .as_ref()
                    .map_or(String::new(), |d| format!(" (cache {})", d.display())),
                cache.dir().display(),
                now.map_or("absent".to_string(), |f| format!("another ({f})"))
            ),
        });
    }
    Ok(())
}

/// The trainer's validation rows of the cache's training split for this run.
pub fn validation_rows(model: &LoadedModel, train_split: &Split) -> Result<gz_model::data::Holdout> {
    let t = &model.sidecar().train;
    gz_model::data::holdout(train_split.len(), t.val_fraction, t.seed, t.max_images).map_err(|e| EvalError::Shape {
        what: "validation split".into(),
        reason: format!("re-deriving the trainer's hold-out: {e}"),
    })
}

/// What `gz eval` scores and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    pub tta: TtaConfig,
    /// Images per forward pass (each under every TTA view).
    pub batch: usize,
    pub central_pixel: CentralPixelConfig,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            tta: TtaConfig::none(),
            batch: 64,
            central_pixel: CentralPixelConfig::default(),
        }
    }
}

/// The content of `metrics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Run name (the run directory's name, or the names joined for an ensemble).
    pub run: String,
    /// Checkpoint file(s) scored (the predictions file for `gz eval --pred`).
    pub checkpoint: String,
    /// Epoch of the checkpoint (first model); 0 for a predictions file.
    pub epoch: usize,
    /// The predictions file scored, when the predictions were read from one (`gz eval --pred`)
    /// rather than made by a checkpoint. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predictions: Option<String>,
    /// Which rows: e.g. `validation (10% hold-out, seed 0) of the training split`.
    pub split: String,
    pub prep_config_hash: String,
    pub config: EvalConfig,
    /// Shortcut of `config.tta`.
    pub tta: TtaConfig,
    pub model: NamedScores,
    /// all zeros, all ones, training mean, central pixel — on the same rows.
    pub baselines: Vec<NamedScores>,
    pub floor: Option<Floor>,
    /// Baseline fit rows (training rows of the training split).
    pub n_fit: usize,
    /// With several predictions per galaxy (TTA views, ensemble members): how their spread
    /// tells the error. Absent with one (and in reports from before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<SpreadScore>,
    /// How the (first) checkpoint was trained, in a line (`tiny, tree head, rmsprop lr 0.002, 40
    /// epochs, batch 16, seed 0`); absent for a predictions file (and in earlier reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained: Option<String>,
    /// The run's validation RMSE of predicting its training mean (its checkpoint's sidecar):
    /// the reference line of a test page's learning curve, which plots validation RMSE, where
    /// this report's own baselines are the test split's. Absent for a predictions file (and in
    /// earlier reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_mean_rmse: Option<f64>,
}

/// The rows to score and the rows the baselines learn from.
pub struct EvalRows<'a> {
    /// Labelled split holding the scored rows.
    pub eval_split: &'a Split,
    pub eval_rows: Vec<usize>,
    /// The training split and the rows the baselines are fitted on.
    pub fit_split: &'a Split,
    pub fit_rows: Vec<usize>,
    /// Labels of `eval_rows` (row-major × 37) when the split itself has none (e.g. a synthetic
    /// test split whose answers are in the dataset's `test_solutions.csv`).
    pub eval_labels: Option<Vec<f32>>,
    /// Human description of the scored rows.
    pub description: String,
}

/// Labels for every row of `split` from a solutions CSV (matched by GalaxyID); an id the file
/// lacks is an error naming it.
pub fn labels_from_csv(split: &Split, path: &Path) -> Result<Vec<f32>> {
    let sol = gz_schema::read_solutions(path)?;
    let index = sol.index();
    let mut out = Vec::with_capacity(split.len() * N_ANSWERS);
    for id in split.ids() {
        let Some(&i) = index.get(id) else {
            return Err(EvalError::BadFile {
                path: path.to_path_buf(),
                reason: format!("no row for GalaxyID {id} of split {}", split.name()),
            });
        };
        out.extend_from_slice(sol.row(i));
    }
    Ok(out)
}

/// The first five of `all`, comma-separated, with `, …` when there are more: the ids a
/// message names.
pub fn first_few(all: &[String]) -> String {
    let shown = all.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if all.len() > 5 {
        format!("{shown}, …")
    } else {
        shown
    }
}

/// A predictions file's rows for a split's rows, matched by GalaxyID ([`predictions_for`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Matched {
    /// The rows' predictions, in the order of the rows asked for, row-major × 37.
    pub values: Vec<f32>,
    /// Ids of the file that are not among the rows (sorted): not scored.
    pub extra: Vec<u64>,
    /// Values of the matched rows outside [0, 1]: scored as given.
    pub outside: usize,
}

/// Takes the predictions of `split`'s `rows` from `pred` (a CSV read from `path`, by
/// GalaxyID). Every row must have one prediction, each of its 37 values finite: missing ids,
/// ids twice and NaNs are one error naming each kind with its count and first ids (a score over
/// part of the rows would not be comparable with any other). Rows of the file for other
/// galaxies are returned as `extra` (once each), for the caller to name: they are not scored,
/// so what they hold is not checked.
pub fn predictions_for(split: &Split, rows: &[usize], pred: &gz_schema::Solutions, path: &Path) -> Result<Matched> {
    let ids = split.ids();
    let wanted: std::collections::HashSet<u64> = rows.iter().map(|&r| ids[r]).collect();
    // the file's rows by id; a scored galaxy's second row is a problem (others are not scored)
    let mut index = std::collections::HashMap::with_capacity(pred.len());
    let mut twice = Vec::new();
    for (i, &id) in pred.ids.iter().enumerate() {
        if index.insert(id, i).is_some() && wanted.contains(&id) {
            twice.push(id);
        }
    }
    let mut values = Vec::with_capacity(rows.len() * N_ANSWERS);
    let (mut missing, mut not_numbers) = (Vec::new(), Vec::new());
    let mut outside = 0;
    for &r in rows {
        let id = ids[r];
        let Some(&i) = index.get(&id) else {
            missing.push(id);
            continue;
        };
        let row = pred.row(i);
        if let Some(k) = row.iter().position(|v| !v.is_finite()) {
            let column = gz_schema::column_names().nth(k).unwrap_or("?");
            not_numbers.push(format!("{id} ({column} is {})", row[k]));
        }
        outside += row.iter().filter(|v| !(0.0..=1.0).contains(*v)).count();
        values.extend_from_slice(row);
    }
    // every kind of problem, each with its count and the first few
    let mut problems = Vec::new();
    if !missing.is_empty() {
        missing.sort_unstable();
        let n = missing.len();
        problems.push(format!(
            "{n} of the {} galaxies scored (split {}) {} no row here: GalaxyID {}",
            rows.len(),
            split.name(),
            if n == 1 { "has" } else { "have" },
            first_few(&missing.iter().map(u64::to_string).collect::<Vec<_>>())
        ));
    }
    if !twice.is_empty() {
        twice.sort_unstable();
        twice.dedup();
        problems.push(format!(
            "{} more than one row (which one to score is not clear): GalaxyID {}",
            if twice.len() == 1 {
                "1 galaxy has".to_string()
            } else {
                format!("{} galaxies have", twice.len())
            },
            first_few(&twice.iter().map(u64::to_string).collect::<Vec<_>>())
        ));
    }
    if !not_numbers.is_empty() {
        problems.push(format!(
            "{} of the scored rows {} a value that is not a finite number (every scored value must be one): GalaxyID {}",
            not_numbers.len(),
            if not_numbers.len() == 1 { "has" } else { "have" },
            first_few(&not_numbers)
        ));
    }
    if !problems.is_empty() {
        let hint = if missing.len() == rows.len() {
            "; are these predictions for this dataset?"
        } else {
            ""
        };
        return Err(EvalError::BadFile {
            path: path.to_path_buf(),
            reason: format!("{}{hint}", problems.join("; ")),
        });
    }
    let mut extra: Vec<u64> = index.keys().copied().filter(|id| !wanted.contains(id)).collect();
    extra.sort_unstable();
    Ok(Matched { values, extra, outside })
}

fn labels_of(split: &Split, rows: &[usize]) -> Result<Vec<f32>> {
    let Some(all) = split.labels() else {
        return Err(EvalError::Shape {
            what: format!("split {}", split.name()),
            reason: "has no labels; cannot score it".into(),
        });
    };
    let mut out = Vec::with_capacity(rows.len() * N_ANSWERS);
    for &r in rows {
        out.extend_from_slice(&all[r * N_ANSWERS..(r + 1) * N_ANSWERS]);
    }
    Ok(out)
}

fn colours_of(split: &Split, rows: &[usize], radius: usize) -> Result<Vec<[f32; 3]>> {
    rows.iter()
        .map(|&r| central_colour(split.image(r), split.shape(), radius))
        .collect()
}

/// Everything `evaluate` returns: the report plus the scored predictions for the gallery.
pub struct Evaluation {
    pub report: EvalReport,
    /// Predictions for `eval_rows`, row-major × 37.
    pub predictions: Vec<f32>,
    /// Labels of `eval_rows`, row-major × 37.
    pub labels: Vec<f32>,
}

/// Scores `model` (any predictor: one checkpoint or an ensemble) on `rows`, with baselines and
/// the Bayes floor (when `data_dir` has the optional files).
#[allow(clippy::too_many_arguments)] // reason: each is a distinct input of the one evaluation
pub fn evaluate(
    model: &dyn Predictor,
    model_name: &str,
    rows: &EvalRows<'_>,
    cfg: &EvalConfig,
    device: &Device,
    data_dir: Option<&Path>,
    progress: &dyn Fn(usize),
    meta: (&str, usize, &str),
) -> Result<Evaluation> {
    cfg.tta.validate()?;
    let labels = labels_for(rows)?;
    // more than one prediction per galaxy (views, members): how they spread, against the error
    let many = cfg.tta.n_views() * model.n_members() > 1;
    let predicted = predict_split(
        model,
        rows.eval_split,
        Some(&rows.eval_rows),
        &cfg.tta,
        cfg.batch,
        device,
        many.then_some(crate::predict::SpreadOf::Kaggle),
        progress,
    )?;
    let predictions = predicted.mean;
    let spread = match &predicted.var {
        // (with fewer galaxies its quarters are not quarters: no spread, rather than one galaxy
        // as both the most and the least spread)
        Some(_) if labels.len() / N_ANSWERS < crate::metrics::MIN_SPREAD_ROWS => None,
        Some(var) => Some(spread_score(
            &predictions,
            var,
            &labels,
            cfg.tta.n_views(),
            model.n_members(),
        )?),
        None => None,
    };
    let (checkpoint, epoch, hash) = meta;
    let source = Source {
        name: model_name,
        checkpoint,
        epoch,
        predictions: None,
        prep_config_hash: hash,
    };
    score_predictions(predictions, labels, spread, &source, rows, cfg, data_dir)
}

/// The labels of `rows.eval_rows` (row-major × 37): given, or the split's own.
fn labels_for(rows: &EvalRows<'_>) -> Result<Vec<f32>> {
    if rows.eval_rows.is_empty() {
        return Err(EvalError::Shape {
            what: "evaluation".into(),
            reason: "no rows to score".into(),
        });
    }
    match &rows.eval_labels {
        Some(l) if l.len() == rows.eval_rows.len() * N_ANSWERS => Ok(l.clone()),
        Some(l) => Err(EvalError::Shape {
            what: "evaluation labels".into(),
            reason: format!("{} values for {} rows", l.len(), rows.eval_rows.len()),
        }),
        None => labels_of(rows.eval_split, &rows.eval_rows),
    }
}

/// What made the predictions a report scores, for `metrics.json` and the page.
pub struct Source<'a> {
    /// The predictor's name in the table (a run's, or a predictions file's stem).
    pub name: &'a str,
    /// The checkpoint file(s), or the predictions file.
    pub checkpoint: &'a str,
    /// The (first) checkpoint's epoch; 0 for a predictions file.
    pub epoch: usize,
    /// The predictions file, when the predictions were read rather than made.
    pub predictions: Option<&'a str>,
    pub prep_config_hash: &'a str,
}

/// Scores predictions made elsewhere (`gz eval --pred`, a CSV from any tool) on `rows` with the
/// same table, baselines and floor as a checkpoint: `predictions` holds `rows.eval_rows`'s,
/// row-major × 37 ([`predictions_for`] matches a file's rows to a split by GalaxyID).
pub fn evaluate_predictions(
    predictions: Vec<f32>,
    source: &Source<'_>,
    rows: &EvalRows<'_>,
    cfg: &EvalConfig,
    data_dir: Option<&Path>,
) -> Result<Evaluation> {
    let labels = labels_for(rows)?;
    if predictions.len() != labels.len() {
        return Err(EvalError::Shape {
            what: "predictions".into(),
            reason: format!("{} values for {} rows", predictions.len(), rows.eval_rows.len()),
        });
    }
    score_predictions(predictions, labels, None, source, rows, cfg, data_dir)
}

fn score_predictions(
    predictions: Vec<f32>,
    labels: Vec<f32>,
    spread: Option<SpreadScore>,
    source: &Source<'_>,
    rows: &EvalRows<'_>,
    cfg: &EvalConfig,
    data_dir: Option<&Path>,
) -> Result<Evaluation> {
    let model_scores = NamedScores {
        name: source.name.to_string(),
        scores: score(&predictions, &labels)?,
    };

    let fit_labels = labels_of(rows.fit_split, &rows.fit_rows)?;
    let fit_colours = colours_of(rows.fit_split, &rows.fit_rows, cfg.central_pixel.radius)?;
    let eval_colours = colours_of(rows.eval_split, &rows.eval_rows, cfg.central_pixel.radius)?;
    let baselines = score_baselines(
        LabelledColours {
            colours: &fit_colours,
            labels: &fit_labels,
        },
        LabelledColours {
            colours: &eval_colours,
            labels: &labels,
        },
        cfg.central_pixel,
    )?;
    let ids: Vec<u64> = rows.eval_rows.iter().map(|&r| rows.eval_split.ids()[r]).collect();
    let floor = match data_dir {
        // (the test split's rows: scored on another split than the baselines were fitted on)
        Some(d) => bayes_floor(d, &ids, &labels, !std::ptr::eq(rows.eval_split, rows.fit_split))?,
        None => None,
    };
    let report = EvalReport {
        run: source.name.to_string(),
        checkpoint: source.checkpoint.to_string(),
        epoch: source.epoch,
        predictions: source.predictions.map(str::to_string),
        split: rows.description.clone(),
        prep_config_hash: source.prep_config_hash.to_string(),
        config: cfg.clone(),
        tta: cfg.tta.clone(),
        model: model_scores,
        baselines,
        floor,
        n_fit: rows.fit_rows.len(),
        spread,
        trained: None,
        val_mean_rmse: None,
    };
    Ok(Evaluation {
        report,
        predictions,
        labels,
    })
}
