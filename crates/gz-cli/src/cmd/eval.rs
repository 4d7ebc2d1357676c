//! `gz eval`: score a checkpoint (or an ensemble) on the trainer's validation split — or on the
//! cache's test split when it is labelled — beside the baselines and, for synthetic data, the
//! Bayes floor; print the table and write the report (`metrics.json`, charts, `index.html`).
//! `--pred FILE` scores a predictions CSV made elsewhere (any tool's submission) on the test
//! split the same way.
//!
//! The last stdout lines are `metrics: <path>` and `report: <path to index.html>`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use gz_eval::baselines::{format_table, CentralPixelConfig};
use gz_eval::eval::{check_cache, check_training_data, evaluate, load_runs, validation_rows, EvalConfig, EvalRows};
use gz_eval::report::{read_epochs, thumbnail_png, write_report, GalleryItem};
use gz_eval::tta::{Ensemble, Predictor};
use gz_schema::N_ANSWERS;

use super::predict::{progress_bar, TtaArgs};

/// Arguments of `gz eval`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Training run directory (or .safetensors); repeat for an ensemble.
    #[arg(long = "run", required_unless_present = "pred", conflicts_with = "pred")]
    runs: Vec<PathBuf>,
    /// Score a predictions CSV made elsewhere instead of a run (Kaggle's submission layout:
    /// GalaxyID and the 37 answers; from any tool): every galaxy of the split needs a row.
    /// Scores the test split.
    #[arg(long)]
    pred: Option<PathBuf>,
    /// Shard cache the run was trained on.
    #[arg(long)]
    cache: PathBuf,
    /// The dataset directory: if it has the optional synthetic extras (expected_*.csv,
    /// floor.json) the Bayes floor is shown.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Which rows to score: `validation` (the trainer's hold-out) or `test` (the cache's test
    /// split, when it has labels) [default: validation; with --pred, test].
    #[arg(long, value_parser = ["validation", "test"])]
    split: Option<String>,
    #[command(flatten)]
    tta: TtaArgs,
    /// cpu, cuda, cuda:N, or auto (CUDA 0 when built with CUDA and a GPU is present, else the CPU).
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Central-pixel benchmark: bins per colour channel, cut at the training quantiles (equal
    /// counts, not equal widths)
    #[arg(long, default_value_t = 4)]
    cp_levels: usize,
    /// Central-pixel benchmark: half-width of the central patch averaged.
    #[arg(long, default_value_t = 1)]
    cp_radius: usize,
    /// Report folder [default: reports/<run name>, or reports/<file stem> with --pred]; missing
    /// folders are created.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Galaxies in the report's gallery.
    #[arg(long, default_value_t = 12)]
    gallery: usize,
}

/// `fraction` as a percentage with three significant digits, trailing zeros dropped.
pub(crate) fn percent(fraction: f64) -> String {
    let p = fraction * 100.0;
    if !(p.is_finite() && p > 0.0) {
        return format!("{p}");
    }
    let decimals = (2 - p.log10().floor() as i64).max(0) as usize;
    let s = format!("{p:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Whether the hold-out's real share of the `used` images is off from the `--val-fraction`
/// asked by more than a tenth of it: rounding to whole images (at least one) makes the
/// fraction misleading on a tiny set (1 of 3 images held out for 0.1 is 33%, not 10%).
fn share_is_misleading(n_val: usize, used: usize, fraction: f64) -> bool {
    used > 0 && (n_val as f64 / used as f64 - fraction).abs() > 0.1 * fraction
}

/// `N image(s)`, with the hold-out's real share when [`share_is_misleading`]: `1 image of 3
/// (33.3%; --val-fraction 0.1 asked for 10%)`.
pub(crate) fn holdout_size(n_val: usize, used: usize, fraction: f64) -> String {
    let images = if n_val == 1 { "image" } else { "images" };
    if share_is_misleading(n_val, used, fraction) {
        format!(
            "{n_val} {images} of {used} ({}%; --val-fraction {fraction} asked for {}%)",
            percent(n_val as f64 / used as f64),
            percent(fraction)
        )
    } else {
        format!("{n_val} {images}")
    }
}

/// The rows `gz eval --split validation` scores: `validation hold-out of the training split (10%,
/// seed 0): 200 images`; the asked share is left out of the brackets when it is not the real
/// one ([`holdout_size`] gives both). A run that trained on `used` of the split's `split_rows`
/// images (`--max-train`) held its share out of those: `… of a 40-image --max-train subset of
/// the training split (25%, seed 0): 10 images` (it read as 25% of the whole split).
fn holdout_description(fraction: f64, seed: u64, n_val: usize, used: usize, split_rows: usize) -> String {
    let share = if share_is_misleading(n_val, used, fraction) {
        String::new()
    } else {
        format!("{}%, ", percent(fraction))
    };
    let subset = if used < split_rows {
        format!("a {used}-image --max-train subset of ")
    } else {
        String::new()
    };
    format!(
        "validation hold-out of {subset}the training split ({share}seed {seed}): {}",
        holdout_size(n_val, used, fraction)
    )
}

fn run_name(p: &std::path::Path) -> String {
    // (`.` or `best.safetensors` from inside the run folder: its name, not "run")
    let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let p = if p.is_file() { p.parent().unwrap_or(&p) } else { &p };
    p.file_name().map(folder_name).unwrap_or_else(|| "run".into())
}

/// A file name as a report folder's: as it is when it is UTF-8, else with each byte that is
/// not as `%XX`, so that two names differing only there get two folders (the lossy `�` gave
/// both one, and the second report replaced the first without a word).
fn folder_name(name: &std::ffi::OsStr) -> String {
    let mut out = String::new();
    for chunk in name.as_encoded_bytes().utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Marks a report's `gallery/` as gz's, written before its first thumbnail: a run stopped
/// before its `metrics.json` leaves thumbnails that a later report may replace, where
/// numbered pictures without the mark are a user's.
const GALLERY_MARK: &str = ".gz-gallery";

/// The report folder: `--report`, else `reports/<name>` (the run's, or the predictions
/// file's stem).
fn report_dir(args: &Args) -> PathBuf {
    args.report
        .clone()
        .unwrap_or_else(|| PathBuf::from("reports").join(report_name(args)))
}

/// The name of what is scored: the run folders' names joined by `+`, or the predictions
/// file's stem.
fn report_name(args: &Args) -> String {
    match &args.pred {
        Some(p) => p
            .file_stem()
            .map(folder_name)
            // (`..csv` and `...csv` have the stems `.` and `..`: not a folder's name)
            .filter(|n| !n.is_empty() && n != "." && n != "..")
            .unwrap_or_else(|| "predictions".into()),
        None => args.runs.iter().map(|r| run_name(r)).collect::<Vec<_>>().join("+"),
    }
}

/// Whether writing a report into `dir` would replace `file`: its page or `metrics.json`, a
/// chart (`*.png`) beside them, or a thumbnail in `gallery/`.
fn report_replaces(dir: &Path, file: &Path) -> bool {
    let (Some(parent), Some(name)) = (file.parent(), file.file_name()) else {
        return false;
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let (Ok(parent), Ok(dir)) = (parent.canonicalize(), dir.canonicalize()) else {
        // a folder not made yet holds nothing
        return false;
    };
    let name = name.to_string_lossy();
    let png = name.to_ascii_lowercase().ends_with(".png");
    (parent == dir && (png || name == "index.html" || name == "metrics.json")) || (parent == dir.join("gallery") && png)
}

/// What the default report folder (`reports/<name>`) is for: a predictions file (`--pred`) or
/// the runs scored (`--run`).
#[derive(Clone, Copy)]
enum Scored<'a> {
    Pred(&'a Path),
    Runs(&'a [PathBuf]),
}

/// The run folders of checkpoint paths (a run folder, or a checkpoint file in one), resolved;
/// `None` when one cannot be (gone, or named relative to another folder).
fn run_folders<'a>(paths: impl Iterator<Item = &'a Path>) -> Option<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = paths
        .map(|p| {
            let p = p.canonicalize().ok()?;
            Some(if p.is_file() { p.parent()?.to_path_buf() } else { p })
        })
        .collect::<Option<_>>()?;
    out.sort();
    Some(out)
}

/// Whether the earlier gz report `held` (its `metrics.json`) in the default folder is of
/// something else than what is scored now (`default_for`; `None` when `--report` was given: the
/// user chose the folder). Two runs are told apart by their folders where both can be found
/// from here (the report records its checkpoints as they were named).
fn default_collides(held: &serde_json::Value, default_for: Option<Scored>) -> bool {
    let Some(ours) = default_for else {
        return false;
    };
    let theirs = held.get("predictions").and_then(|p| p.as_str());
    match (theirs, ours) {
        (None, Scored::Runs(runs)) => {
            let checkpoints = held.get("checkpoint").and_then(|c| c.as_str()).unwrap_or_default();
            let held_runs = run_folders(checkpoints.split(", ").map(Path::new));
            let our_runs = run_folders(runs.iter().map(PathBuf::as_path));
            matches!((held_runs, our_runs), (Some(h), Some(o)) if h != o)
        }
        (Some(_), Scored::Runs(_)) | (None, Scored::Pred(_)) => true,
        (Some(t), Scored::Pred(ours)) => {
            let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
                (Ok(a), Ok(b)) => a == b,
                _ => a == b,
            };
            !same(Path::new(t), ours)
        }
    }
}

/// Refuses a `--report` folder that holds files a report would replace or remove
/// (`index.html`, `metrics.json`, the charts, `gallery/`) when they are not an earlier gz
/// report's: a user's own page or figures. Anything else in the folder stays (`cargo xtask`
/// keeps the submission and the test split's report there).
fn check_report_folder(dir: &Path, flag: &str, default_for: Option<Scored>) -> anyhow::Result<()> {
    let refuse = |what: &str| {
        bail!(
            "{flag} {}: {what}, and a report would replace it: name a new folder (or one holding an earlier report)",
            dir.display()
        )
    };
    let gdir = dir.join("gallery");
    if let Ok(m) = gdir.symlink_metadata() {
        if m.file_type().is_symlink() {
            // over an earlier report its numbered pictures are replaced: not through a link,
            // somewhere outside the report
            return refuse("its gallery is a link");
        }
        if !m.is_dir() {
            return refuse("its gallery is not a folder");
        }
    }
    let read = |name: &str| {
        std::fs::read(dir.join(name))
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    // every gz report's page shows its per-question chart
    let page = read("index.html").map(|t| t.contains("per_question.png"));
    // (read once: whether it is gz's, and what it scored)
    let held = read("metrics.json").map(|t| serde_json::from_str::<serde_json::Value>(&t).unwrap_or_default());
    let metrics = held
        .as_ref()
        .map(|v| v.get("baselines").is_some() && v.get("model").is_some());
    for (name, ours) in [("index.html", page), ("metrics.json", metrics)] {
        if ours == Some(false) {
            return refuse(&format!("its {name} is not a gz report's"));
        }
    }
    // the default folder is named after what is scored, and names collide (two runs' files
    // called test_predictions.csv; a run and a file of its predictions named like it): there
    // only a report of the same thing is replaced
    if default_for.is_some() && page == Some(true) && metrics.is_none() {
        bail!(
            "{flag} {}: it holds a report without its metrics.json, so what it scored cannot be told: name a \
             folder with --report",
            dir.display()
        );
    }
    if let Some(v) = held
        .as_ref()
        .filter(|_| metrics == Some(true))
        .filter(|v| default_collides(v, default_for))
    {
        let held = v
            .get("predictions")
            .and_then(|p| p.as_str())
            .map(|p| format!("predictions {p}"))
            .or_else(|| {
                v.get("checkpoint")
                    .and_then(|c| c.as_str())
                    .map(|c| format!("checkpoint {c}"))
            })
            .unwrap_or_else(|| "something else".into());
        bail!(
            "{flag} {}: it holds the report of {held}, not of what is scored now: name a folder with --report",
            dir.display()
        );
    }
    if page.is_none() && metrics.is_none() {
        // a gallery marked as gz's (or an empty one) is a run of gz eval stopped before its
        // metrics.json, written first, so the charts are never without it: taken up (its
        // numbered thumbnails replaced, anything else kept); numbered pictures without the
        // mark are a user's
        let names: Vec<String> = std::fs::read_dir(&gdir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let ours = names.is_empty() || names.iter().any(|n| n == GALLERY_MARK);
        let taken: Vec<&str> = ["per_question.png", "learning_curve.png", "spread.png", "gallery"]
            .into_iter()
            .filter(|n| dir.join(n).exists() && !(*n == "gallery" && ours))
            .collect();
        if !taken.is_empty() {
            let hint = if taken == ["gallery"] && names.iter().all(|n| thumbnail(n)) {
                " (if its numbered pictures are thumbnails of a gz eval stopped before reports marked their \
                 gallery, remove gallery/ or create gallery/.gz-gallery)"
            } else {
                ""
            };
            return refuse(&format!("it holds {} but no earlier report{hint}", taken.join(", ")));
        }
    }
    Ok(())
}

/// The report folder's lock file while a `gz eval` writes there ([`crate::lock`]).
const REPORT_LOCK: &str = ".gz-eval.lock";

/// A report's thumbnail: `<GalaxyID>.png`.
fn thumbnail(name: &str) -> bool {
    name.strip_suffix(".png")
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
}

/// gz's temporary of a thumbnail being written (`.<GalaxyID>.png.<pid>.tmp`, by
/// `gz_schema::write_atomic`): what a killed report leaves in its gallery.
fn thumbnail_temporary(name: &str) -> bool {
    temporary_of(name, thumbnail)
}

/// gz's temporary of a report's own file (`.metrics.json.<pid>.tmp`, `.spread.png.<pid>.tmp`,
/// …): what a killed report leaves beside its page.
fn report_temporary(name: &str) -> bool {
    temporary_of(name, |f| {
        matches!(f, "metrics.json" | "index.html") || f.ends_with(".png")
    })
}

/// Whether `name` is `gz_schema::write_atomic`'s temporary (`.<file>.<pid>.tmp`) of a file `of`
/// accepts.
fn temporary_of(name: &str, of: impl Fn(&str) -> bool) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.strip_suffix(".tmp"))
        .and_then(|n| n.rsplit_once('.'))
        .is_some_and(|(file, pid)| of(file) && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// The rows of the cache's test split, labelled by the split itself or by `--data`'s
/// `test_solutions.csv`; the baselines are fitted on `fit_rows` of the training split.
fn test_rows<'a>(
    args: &Args,
    cache: &'a gz_shards::Cache,
    train: &'a gz_shards::Split,
    fit_rows: Vec<usize>,
) -> anyhow::Result<EvalRows<'a>> {
    let Some(test) = cache.test() else {
        bail!("{}; or score --split validation", super::no_test_split(&args.cache))
    };
    test.verify()
        .with_context(|| format!("checking the test split of {}", args.cache.display()))?;
    let other = if args.pred.is_some() {
        "a predictions file can only be scored on a labelled test split"
    } else {
        "or use --split validation"
    };
    let eval_labels = match (test.labels(), &args.data) {
        (Some(_), _) => None,
        (None, Some(d)) if d.join("test_solutions.csv").is_file() => {
            Some(gz_eval::eval::labels_from_csv(test, &d.join("test_solutions.csv"))?)
        }
        (None, None) => bail!(
            "the test split of {} has no labels: pass --data DIR with the dataset's test_solutions.csv \
             (a synthetic set has one; a real Kaggle test set does not); {other}",
            args.cache.display()
        ),
        _ => bail!(
            "the test split of {} has no labels and --data has no test_solutions.csv (a real Kaggle test set); {other}",
            args.cache.display()
        ),
    };
    Ok(EvalRows {
        eval_labels,
        eval_split: test,
        eval_rows: (0..test.len()).collect(),
        fit_split: train,
        fit_rows,
        description: format!(
            "test split: {}{}",
            super::count(test.len(), "image"),
            if test.labels().is_none() {
                " (labels from test_solutions.csv)"
            } else {
                ""
            }
        ),
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(p) = &args.pred {
        if p.as_os_str() == "-" {
            bail!("--pred -: name the predictions file (standard input is not read here)");
        }
        // the options only a model predicting here reads
        let given = args.tta.given_with(&args.device, args.batch);
        if !given.is_empty() {
            bail!(
                "{} {} only to a model predicting here (--run); --pred scores predictions made already \
                 (give these options to whatever made them, e.g. `gz predict`)",
                given.join(", "),
                if given.len() == 1 { "applies" } else { "apply" }
            );
        }
        if args.split.as_deref() == Some("validation") {
            bail!(
                "--pred with --split validation: the validation rows are a training run's hold-out, which a \
                 predictions file does not name; --pred scores the test split (a synthetic set has its labels)"
            );
        }
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    // before the scoring, not after it; the default folder (reports/<name>) as one given
    let dir = report_dir(&args);
    let flag = if args.report.is_some() {
        "--report".to_string()
    } else {
        "--report (by default)".to_string()
    };
    super::check_output(&flag, &dir, true)?;
    super::check_not_an_input(&flag, &dir, &[], &[&args.cache], None)?;
    let default_for = args.report.is_none().then(|| match &args.pred {
        Some(p) => Scored::Pred(p),
        None => Scored::Runs(&args.runs),
    });
    // a link to nothing: creating the folder (for its lock) fails with a bare "File exists"
    if dir.symlink_metadata().is_ok() && !dir.exists() {
        bail!(
            "{flag} {}: a link to nothing (no folder there to write into)",
            dir.display()
        );
    }
    super::check_writable(&flag, &dir, true)?;
    // held until the report is written (the end of this function): a second gz eval into the
    // folder is refused, where the two would write the same files (one reporting success over
    // the other's report, or failing on a file the other had removed)
    let _lock = crate::lock::FolderLock::take(
        &dir,
        REPORT_LOCK,
        &crate::lock::Holder {
            command: "gz eval",
            doing: "writing its report there",
            instead: "name another folder with --report",
        },
    )?;
    if let Some(lock) = &_lock {
        lock.remove_on_signal();
    }
    check_report_folder(&dir, &flag, default_for)?;
    // nor may the report replace what it reads: the predictions file, a checkpoint
    let inputs: Vec<PathBuf> = super::run_inputs(&args.runs)
        .into_iter()
        .chain(args.pred.iter().cloned())
        .collect();
    for input in &inputs {
        if report_replaces(&dir, input) {
            bail!(
                "{flag} {}: the report would replace {}, which this command reads: name another folder",
                dir.display(),
                input.display()
            );
        }
    }
    if let Some(d) = &args.data {
        // a typo is not a dataset without the optional files: said before the scoring
        if !d.is_dir() {
            let hint = if args.pred.is_some() {
                "the dataset the cache was prepared from, whose test_solutions.csv holds the labels"
            } else {
                "the dataset the cache was prepared from; leave --data out for no Bayes floor"
            };
            bail!("--data {}: no such folder ({hint})", d.display());
        }
    }
    if let Some(pred) = &args.pred {
        return run_pred(&args, pred);
    }
    let split = args.split.as_deref().unwrap_or("validation");
    let tta = args.tta.config()?;
    // (the error names the device asked for)
    let device = gz_model::device::select_device(&args.device)?;
    let models = load_runs(&args.runs, &device)?;
    super::warn_repeated_checkpoints(&models);
    let cache = super::open_cache(&args.cache)?;
    for (m, r) in models.iter().zip(&args.runs) {
        check_cache(m, r, &cache)?;
        if split == "validation" {
            check_training_data(m, r, &cache)?;
        }
    }
    let Some(train) = cache.train() else {
        bail!("cache {} has no training split", args.cache.display())
    };
    if train.is_empty() {
        bail!(
            "cache {} has no training images: gz eval fits its baselines (training mean, central pixel) on them and \
             draws a run's validation hold-out from them; score with the cache the run was trained on",
            args.cache.display()
        );
    }
    // the images' bits against their checksums (opening reads only headers, ids and labels)
    train
        .verify()
        .with_context(|| format!("checking the training split of {}", args.cache.display()))?;
    let first = &models[0];
    let holdout = validation_rows(first, train)?;
    if models.len() > 1 && split == "validation" {
        for (m, r) in models.iter().zip(&args.runs).skip(1) {
            if validation_rows(m, train)?.val != holdout.val {
                bail!(
                    "{} was validated on other images than {} (another seed, --val-fraction or --max-train); score the ensemble \
                     with --split test",
                    r.display(),
                    args.runs[0].display()
                );
            }
        }
    }
    let t = &first.sidecar().train;
    let rows = if split == "validation" {
        EvalRows {
            eval_split: train,
            eval_rows: holdout.val.clone(),
            fit_split: train,
            fit_rows: holdout.train.clone(),
            eval_labels: None,
            description: holdout_description(
                t.val_fraction,
                t.seed,
                holdout.val.len(),
                holdout.val.len() + holdout.train.len(),
                train.len(),
            ),
        }
    } else {
        test_rows(&args, &cache, train, holdout.train.clone())?
    };
    let name = report_name(&args);
    let members: Vec<&dyn Predictor> = models.iter().map(|m| m as &dyn Predictor).collect();
    let ensemble = Ensemble { members };
    let cfg = EvalConfig {
        tta,
        batch: args.batch,
        central_pixel: CentralPixelConfig {
            levels: args.cp_levels,
            radius: args.cp_radius,
        },
    };
    note_cp_radius(&args, &rows);
    let checkpoints = models
        .iter()
        .map(|m| m.weights_path().display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let pb = progress_bar(rows.eval_rows.len(), "eval");
    let mut ev = evaluate(
        &ensemble,
        &name,
        &rows,
        &cfg,
        &device,
        args.data.as_deref(),
        &|n| pb.set_position(n as u64),
        (checkpoints.as_str(), first.sidecar().epoch, cache.config_hash()),
    )?;
    pb.finish_and_clear();
    // a checkpoint whose network overflows (finite weights, NaN or infinite outputs) has no
    // score: refused, as `--pred` refuses such predictions, not reported as "RMSE NaN"
    let bad_rows = ev
        .predictions
        .chunks(gz_schema::N_ANSWERS)
        .filter(|r| r.iter().any(|v| !v.is_finite()))
        .count();
    if bad_rows > 0 {
        bail!(
            "{checkpoints} predicts NaN or infinite values for {bad_rows} of the {} galaxies scored: its \
             network overflows (weights from a diverged or damaged run), so it has no score; retrain it \
             (e.g. with a lower --lr)",
            rows.eval_rows.len()
        );
    }
    let run_dir = if args.runs[0].is_dir() {
        args.runs[0].clone()
    } else {
        args.runs[0].parent().map(PathBuf::from).unwrap_or_default()
    };
    // how far the run got (its last state), for a run stopped early or unfinished
    let done = gz_model::checkpoint::read_sidecar(&run_dir.join("last.json"))
        .ok()
        .map(|l| l.epoch);
    ev.report.trained = Some(trained_line(first.sidecar(), models.len(), done));
    // the learning curve is the first run's: its validation training mean is its reference line
    ev.report.val_mean_rmse = Some(first.sidecar().baseline_val_rmse);

    let mj = run_dir.join("metrics.jsonl");
    let epochs = if mj.is_file() {
        Some(read_epochs(&mj)?)
    } else {
        eprintln!("note: {} not found; the report has no learning curve", mj.display());
        None
    };
    // an ensemble's curve is its first member's: the page says so
    let curve_of = (args.runs.len() > 1).then(|| run_dir.display().to_string());
    publish(&args, &name, &ev, &rows, epochs.as_deref(), curve_of.as_deref())
}

/// A central-pixel patch as large as the image is said, not silently averaged.
fn note_cp_radius(args: &Args, rows: &EvalRows<'_>) {
    let side = rows.eval_split.shape()[1].min(rows.eval_split.shape()[2]);
    if 2 * args.cp_radius + 1 >= side {
        eprintln!(
            "note: --cp-radius {} covers the whole {side}-px image: the central-pixel baseline averages the whole image",
            args.cp_radius
        );
    }
}

/// `gz eval --pred FILE`: a predictions CSV made elsewhere, scored on the cache's test split
/// beside the same baselines (fitted on every training row) and floor as a checkpoint.
fn run_pred(args: &Args, pred_path: &Path) -> anyhow::Result<()> {
    let pred = gz_eval::submission::read_predictions(pred_path)?;
    if let Some(w) = gz_eval::submission::Class1Sums::of(&pred).warning() {
        eprintln!("warning: {}: {w}", pred_path.display());
    }
    let cache = super::open_cache(&args.cache)?;
    let Some(train) = cache.train() else {
        bail!(
            "cache {} has no training split (the baselines learn from it)",
            args.cache.display()
        )
    };
    if train.is_empty() {
        bail!(
            "cache {} has no training images: gz eval fits its baselines (training mean, central pixel) on them; \
             score with a cache of a dataset that has training images",
            args.cache.display()
        );
    }
    train
        .verify()
        .with_context(|| format!("checking the training split of {}", args.cache.display()))?;
    let rows = test_rows(args, &cache, train, (0..train.len()).collect())?;
    let matched = gz_eval::eval::predictions_for(rows.eval_split, &rows.eval_rows, &pred, pred_path)?;
    if !matched.extra.is_empty() {
        note_extra_rows(&args.cache, train, pred_path, &matched.extra)?;
    }
    if matched.outside > 0 {
        eprintln!(
            "note: {} of {} outside [0, 1], scored as given (`gz submit` clips them)",
            super::count(matched.outside, "value"),
            pred_path.display()
        );
    }
    note_cp_radius(args, &rows);
    let name = report_name(args);
    // absolute: the default folder's later runs tell the same file by it, from any folder
    let file = pred_path
        .canonicalize()
        .unwrap_or_else(|_| pred_path.to_path_buf())
        .display()
        .to_string();
    let cfg = EvalConfig {
        central_pixel: CentralPixelConfig {
            levels: args.cp_levels,
            radius: args.cp_radius,
        },
        ..EvalConfig::default()
    };
    let source = gz_eval::eval::Source {
        name: &name,
        checkpoint: &file,
        epoch: 0,
        predictions: Some(&file),
        prep_config_hash: cache.config_hash(),
    };
    let ev = gz_eval::eval::evaluate_predictions(matched.values, &source, &rows, &cfg, args.data.as_deref())?;
    publish(args, &name, &ev, &rows, None, None)
}

/// Names the rows of a predictions file that are not scored, by what they are: test images
/// `gz prep` skipped (unreadable, named in the cache's manifest), the cache's training
/// galaxies, or galaxies the cache does not hold.
fn note_extra_rows(cache: &Path, train: &gz_shards::Split, file: &Path, extra: &[u64]) -> anyhow::Result<()> {
    let (_, skipped) = super::submit::cache_test_ids(cache)?;
    let skipped: std::collections::HashMap<u64, &super::submit::SkippedImage> =
        skipped.iter().map(|s| (s.id, s)).collect();
    let training: std::collections::HashSet<u64> = train.ids().iter().copied().collect();
    let (mut unreadable, mut trained, mut other) = (Vec::new(), Vec::new(), Vec::new());
    for id in extra {
        if let Some(s) = skipped.get(id) {
            unreadable.push(format!("{id} ({}: {})", s.path, s.reason));
        } else if training.contains(id) {
            trained.push(id.to_string());
        } else {
            other.push(id.to_string());
        }
    }
    for (ids, what) in [
        (&unreadable, "test images gz prep could not read"),
        (&trained, "training galaxies of the cache"),
        (&other, "galaxies the cache does not hold"),
    ] {
        if !ids.is_empty() {
            eprintln!(
                "note: {} of {} {} not scored, {what}: GalaxyID {}",
                super::count(ids.len(), "row"),
                file.display(),
                if ids.len() == 1 { "is" } else { "are" },
                gz_eval::eval::first_few(ids)
            );
        }
    }
    Ok(())
}

/// Prints the table (and the spread's line) and writes the report; the last lines name
/// `metrics.json` and the page.
fn publish(
    args: &Args,
    name: &str,
    ev: &gz_eval::eval::Evaluation,
    rows: &EvalRows<'_>,
    epochs: Option<&[gz_eval::report::EpochRow]>,
    curve_of: Option<&str>,
) -> anyhow::Result<()> {
    let views = ev.report.tta.n_views();
    // (a checkpoint scored on one view is said so: the pipeline's report of the same run uses
    // 8, and a plain `gz eval` into its folder read as a worse model)
    let tta_note = if views > 1 {
        format!(" ({views} TTA views)")
    } else if ev.report.predictions.is_none() && ev.report.tta == gz_eval::tta::TtaConfig::none() {
        " (1 view, no test-time augmentation: --tta 8 averages 8)".to_string()
    } else if ev.report.predictions.is_none() {
        " (1 TTA view)".to_string()
    } else {
        String::new()
    };
    println!("{} — {}{tta_note}", name, ev.report.split);
    print!(
        "{}",
        format_table(
            std::slice::from_ref(&ev.report.model),
            &ev.report.baselines,
            ev.report.floor.as_ref()
        )
    );
    // which rows the fitted baselines learnt from (a run's training part without its hold-out,
    // or every labelled training image with --pred): the same predictions scored both ways got
    // different baselines, unexplained
    println!(
        "(training mean and central pixel fitted on {})",
        super::count(ev.report.n_fit, "training image")
    );
    // the page's warnings, here too
    for w in gz_eval::report::page_warnings(&ev.report) {
        eprintln!("warning: {w}");
    }
    if let Some(sp) = &ev.report.spread {
        println!("{}", sp.sentence());
    } else if views * args.runs.len() > 1 && ev.report.model.scores.rows < gz_eval::metrics::MIN_SPREAD_ROWS {
        // (said, not left out in silence: several predictions per galaxy, too few galaxies)
        println!(
            "{}",
            gz_eval::metrics::spread_not_scored(views, args.runs.len(), ev.report.model.scores.rows)
        );
    }
    if let Some(f) = &ev.report.floor {
        // the floor is the noise-free truth's own error against the volunteers' votes: far
        // below it, the predictions have seen these very labels
        if ev.report.model.scores.rmse < 0.9 * f.rmse {
            eprintln!(
                "note: {} scores {:.5}, far below the Bayes floor ({:.5}): no model of the images gets there; \
                 were these labels among its inputs?",
                name, ev.report.model.scores.rmse, f.rmse
            );
        }
    }

    let dir = report_dir(args);
    let gdir = dir.join("gallery");
    std::fs::create_dir_all(&gdir).with_context(|| format!("creating {}", gdir.display()))?;
    let mark = gdir.join(GALLERY_MARK);
    std::fs::write(&mark, b"").with_context(|| format!("writing {}", mark.display()))?;
    // an earlier report's page goes first: this report replaces its files one by one, and one
    // that fails part-way (a full disk) would leave that page showing the old scores beside the
    // new metrics.json and charts, its gallery gone; index.html is written last
    let index = dir.join("index.html");
    match std::fs::remove_file(&index) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing the earlier report's {}", index.display()));
        }
        _ => {}
    }
    // the files a killed report left half written beside the page go
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e.with_context(|| format!("reading {}", dir.display()))?.path();
        if p.file_name().is_some_and(|n| report_temporary(&n.to_string_lossy())) {
            std::fs::remove_file(&p).with_context(|| format!("removing the half-written {}", p.display()))?;
        }
    }
    // thumbnails of an earlier report (`<GalaxyID>.png`) go, and those a killed one left half
    // written: the gallery shows this one's only
    for e in std::fs::read_dir(&gdir).with_context(|| format!("reading {}", gdir.display()))? {
        let p = e.with_context(|| format!("reading {}", gdir.display()))?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if thumbnail(&name) || thumbnail_temporary(&name) {
            std::fs::remove_file(&p).with_context(|| format!("removing the old thumbnail {}", p.display()))?;
        }
    }
    let mut gallery = Vec::new();
    for (k, &r) in rows.eval_rows.iter().take(args.gallery).enumerate() {
        let id = rows.eval_split.ids()[r];
        let rel = format!("gallery/{id}.png");
        thumbnail_png(rows.eval_split.image(r), rows.eval_split.shape(), &dir.join(&rel))?;
        gallery.push(GalleryItem {
            id,
            thumb: rel,
            pred: ev.predictions[k * N_ANSWERS..(k + 1) * N_ANSWERS].to_vec(),
            truth: ev.labels[k * N_ANSWERS..(k + 1) * N_ANSWERS].to_vec(),
        });
    }
    let paths = write_report(&dir, &ev.report, epochs, curve_of, &gallery)?;
    println!("metrics: {}", paths.metrics.display());
    println!("report: {}", paths.index.display());
    Ok(())
}

/// How a checkpoint was trained, in a line for the report: `tiny, tree head, rmsprop lr 0.002,
/// schedule step:28,36, best epoch 30 of 40, batch 16, seed 0` (the checkpoint's epoch of the
/// run's; "first of N" for an ensemble). `done`, the run's last epoch, tells a run stopped by
/// its patience (`best epoch 3, stopped by patience after epoch 4 of 20`) or unfinished (`best
/// epoch 3, 4 of 20 epochs trained`) from a whole one: "epoch 3 of 20" read as interrupted.
fn trained_line(s: &gz_model::checkpoint::Sidecar, members: usize, done: Option<usize>) -> String {
    let t = &s.train;
    let schedule = match &t.schedule {
        gz_model::optim::Schedule::Constant => String::new(),
        other => format!(", schedule {other}"),
    };
    let epoch = epoch_phrase(s.weights_file.starts_with("best"), s.epoch, t.epochs, t.patience, done);
    format!(
        "{}{}, {} head, {} lr {}{schedule}, {epoch}, batch {}, seed {}{}",
        if members > 1 {
            format!("first of {members}: ")
        } else {
            String::new()
        },
        s.model.arch.name(),
        s.model.output.name(),
        t.optimizer.name(),
        t.lr,
        t.batch,
        t.seed,
        if t.augment.enabled { ", augmented" } else { "" }
    )
}

/// The checkpoint's epoch in [`trained_line`]: `best epoch 30 of 40`; with the run's last
/// epoch `done` short of the `epochs` asked, `best epoch 3, stopped by patience after epoch 4
/// of 20` (`patience` epochs without a better one) or `best epoch 3, 4 of 20 epochs trained`.
fn epoch_phrase(best: bool, epoch: usize, epochs: usize, patience: Option<usize>, done: Option<usize>) -> String {
    let which = if best { "best epoch" } else { "epoch" };
    match done {
        Some(d) if d < epochs && patience.is_some_and(|p| d.saturating_sub(epoch) >= p) => {
            format!("{which} {epoch}, stopped by patience after epoch {d} of {epochs}")
        }
        Some(d) if d < epochs => format!("{which} {epoch}, {d} of {epochs} epochs trained"),
        _ => format!("{which} {epoch} of {epochs}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run stopped by its patience or unfinished is not read as one whose checkpoint is an
    /// interrupted run's ("epoch 3 of 20").
    /// Names that differ only in bytes that are not UTF-8 get different report folders.
    #[cfg(unix)]
    #[test]
    fn non_utf8_names_get_their_own_folders() {
        use std::os::unix::ffi::OsStrExt as _;
        let a = folder_name(std::ffi::OsStr::from_bytes(b"bad\xffname"));
        let b = folder_name(std::ffi::OsStr::from_bytes(b"bad\xfename"));
        assert_eq!((a.as_str(), b.as_str()), ("bad%FFname", "bad%FEname"));
        assert_eq!(folder_name(std::ffi::OsStr::new("run 1")), "run 1");
    }

    #[test]
    fn the_epoch_phrase_tells_early_stops_and_unfinished_runs() {
        assert_eq!(epoch_phrase(true, 30, 40, None, Some(40)), "best epoch 30 of 40");
        assert_eq!(epoch_phrase(true, 30, 40, Some(5), None), "best epoch 30 of 40");
        assert_eq!(
            epoch_phrase(true, 3, 20, Some(1), Some(4)),
            "best epoch 3, stopped by patience after epoch 4 of 20"
        );
        assert_eq!(
            epoch_phrase(true, 3, 20, None, Some(4)),
            "best epoch 3, 4 of 20 epochs trained"
        );
        assert_eq!(
            epoch_phrase(true, 3, 20, Some(2), Some(4)),
            "best epoch 3, 4 of 20 epochs trained"
        );
        assert_eq!(
            epoch_phrase(false, 4, 20, None, Some(4)),
            "epoch 4, 4 of 20 epochs trained"
        );
    }

    /// The hold-out's share as the run set it: `--val-fraction 0.005` was shown as "0%".
    #[test]
    fn a_small_validation_fraction_is_not_shown_as_zero() {
        assert_eq!(percent(0.1), "10");
        assert_eq!(percent(0.005), "0.5");
        assert_eq!(percent(0.25), "25");
        assert_eq!(percent(1.0 / 3.0), "33.3");
        assert_eq!(percent(1e-9), "0.0000001");
    }

    /// A tiny set's hold-out says its real share when rounding makes the asked one misleading
    /// (1 of 3 images was "(10%, seed 0): 1 images"), and "image" for one.
    #[test]
    fn a_tiny_holdout_states_its_real_share() {
        assert_eq!(
            holdout_description(0.1, 0, 1, 3, 3),
            "validation hold-out of the training split (seed 0): 1 image of 3 (33.3%; --val-fraction 0.1 asked for 10%)"
        );
        assert_eq!(
            holdout_description(0.1, 7, 200, 2000, 2000),
            "validation hold-out of the training split (10%, seed 7): 200 images"
        );
        // within a tenth of the asked share: as asked
        assert_eq!(
            holdout_description(0.1, 0, 20, 195, 195),
            "validation hold-out of the training split (10%, seed 0): 20 images"
        );
        // a --max-train run's hold-out is a share of its subset, and says so
        assert_eq!(
            holdout_description(0.25, 0, 10, 40, 200),
            "validation hold-out of a 40-image --max-train subset of the training split (25%, seed 0): 10 images"
        );
        assert_eq!(holdout_size(1, 20, 0.05), "1 image");
        assert_eq!(
            holdout_size(2, 15, 0.1),
            "2 images of 15 (13.3%; --val-fraction 0.1 asked for 10%)"
        );
    }
}
