//! `gz submit`: write a Kaggle submission, or check one.
//!
//! - `gz submit --pred PRED.csv --out submission.csv [--ids DIR]`: from `gz predict` output;
//! - `gz submit --run RUN [--run ..] (--cache DIR | --images DIR) [--tta N] --out submission.csv`:
//!   predict and write in one go;
//! - `gz submit --check FILE [--ids DIR]`: validate any file and list every problem (`--images`
//!   stands for `--ids` here too).
//!
//! The file is clipped to [0, 1], sorted by id, complete for the test ids (`--ids` folder of
//! test JPEGs, or the `--images` folder), checked, and only then published atomically. Missing
//! or non-finite rows fail the command unless `--fill-mean` fills them with the training mean
//! and lists them. The last stdout line is `submission: <path>`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use gz_eval::submission::{check, ids_from_dir, read_predictions, write_submission};

use super::predict::{predict, SourceArgs, TtaArgs};

/// Arguments of `gz submit`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Check this submission file instead of writing one.
    #[arg(long, conflicts_with_all = ["pred", "runs", "out"])]
    check: Option<PathBuf>,
    /// Predictions CSV from `gz predict`.
    #[arg(long, conflicts_with = "runs")]
    pred: Option<PathBuf>,
    /// Predict with these checkpoints first (as `gz predict --run`).
    #[arg(long = "run")]
    runs: Vec<PathBuf>,
    /// With --run: the shard cache whose test split is predicted.
    #[arg(long, conflicts_with = "images")]
    cache: Option<PathBuf>,
    /// With --run: a folder of test JPEGs to predict. Also the default for --ids (with --pred and
    /// --check too).
    #[arg(long)]
    images: Option<PathBuf>,
    #[command(flatten)]
    tta: TtaArgs,
    /// With --run: cpu, cuda, cuda:N, or auto (CUDA 0 when built with CUDA and a GPU is present, else the CPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// With --run: images per forward pass.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Folder of the test JPEGs (<GalaxyID>.jpg): the submission must have exactly these ids.
    #[arg(long)]
    ids: Option<PathBuf>,
    /// Fill missing or non-finite rows with the training mean (and list them) instead of failing.
    #[arg(long)]
    fill_mean: bool,
    /// With --pred --fill-mean: training labels to take the mean of [default:
    /// <IDS>/../training_solutions_rev1.csv].
    #[arg(long)]
    train_labels: Option<PathBuf>,
    /// Where to write the submission: a file, written whole (missing folders are created; `-`
    /// is refused).
    #[arg(long)]
    out: Option<PathBuf>,
}

impl Args {
    /// The device a model runs on: with `--run` (predicting first), `--device`; else none.
    pub fn model_device(&self) -> Option<&str> {
        (!self.runs.is_empty()).then_some(self.device.as_str())
    }
}

/// The options given that only predicting (`--run`) reads, by their flag names: with `--pred`
/// or `--check` they would be ignored, so they are refused instead. (Default values are
/// indistinguishable from absent ones here, which is harmless: they change nothing.)
fn prediction_options(args: &Args) -> Vec<&'static str> {
    let mut given: Vec<&'static str> = args.cache.iter().map(|_| "--cache").collect();
    given.extend(args.tta.given_with(&args.device, args.batch));
    given
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (mode, what) = if args.check.is_some() {
        ("--check", "checks a finished file")
    } else {
        (
            "--pred",
            "writes predictions made already (give these options to `gz predict`)",
        )
    };
    if args.pred.is_none() && args.check.is_none() && args.train_labels.is_some() {
        bail!("--train-labels applies with --pred --fill-mean; with --run the checkpoint's training mean fills rows");
    }
    let ignored = prediction_options(&args);
    if (args.check.is_some() || args.pred.is_some()) && !ignored.is_empty() {
        bail!(
            "{} {} only with --run (predicting here); {mode} {what}",
            ignored.join(", "),
            if ignored.len() == 1 { "applies" } else { "apply" }
        );
    }
    if let Some(file) = &args.check {
        if args.fill_mean || args.train_labels.is_some() {
            bail!("--fill-mean and --train-labels apply when writing a submission, not to --check");
        }
        // `--images` is the default for `--ids` here too, as when writing: ignored, it let an
        // incomplete file pass as "valid"
        return run_check(file, ids_source(&args));
    }
    let Some(out) = args.out.clone() else {
        bail!("--out FILE is required (or use --check FILE)")
    };
    // before reading or predicting anything
    if out == Path::new("-") {
        // (it wrote a file named `-`)
        bail!("--out -: a submission is written to a file, whole, through a temporary: name one (e.g. submission.csv)");
    }
    super::check_output("--out", &out, false)?;
    let ids_dir = ids_source(&args).map(|(_, d)| d.clone());
    // the output may not replace what the command reads: the predictions, checkpoints, training labels (as
    // given, or the Kaggle layout's beside the test images), an image
    let inputs: Vec<PathBuf> = super::run_inputs(&args.runs)
        .into_iter()
        .chain(args.pred.iter().cloned())
        .chain(args.train_labels.iter().cloned())
        .chain(ids_dir.iter().map(|d| d.join("../training_solutions_rev1.csv")))
        .chain(args.images.iter().filter(|p| p.is_file()).cloned())
        .collect();
    let folders: Vec<&Path> = args.cache.iter().map(PathBuf::as_path).collect();
    for images in [args.images.as_deref(), ids_dir.as_deref()].into_iter().flatten() {
        super::check_not_an_input("--out", &out, &inputs, &folders, Some(images).filter(|p| p.is_dir()))?;
    }
    super::check_not_an_input("--out", &out, &inputs, &folders, None)?;
    super::check_replaceable("--out", &out)?;
    super::check_writable("--out", &out, false)?;
    let mut ids = read_ids(ids_source(&args))?;
    let (pred, mean) = if let Some(pred_path) = &args.pred {
        let pred = read_predictions(pred_path)?;
        if let Some(w) = gz_eval::submission::Class1Sums::of(&pred).warning() {
            eprintln!("warning: {}: {w}", pred_path.display());
        }
        // the training labels are read only when a row needs filling
        let needs_fill = pred.values.iter().any(|v| !v.is_finite())
            || ids.as_ref().is_some_and(|ids| {
                let have: std::collections::HashSet<u64> = pred.ids.iter().copied().collect();
                ids.iter().any(|id| !have.contains(id))
            });
        let mean = if args.fill_mean && needs_fill {
            let labels = match (&args.train_labels, &ids_dir) {
                (Some(p), _) => p.clone(),
                (None, Some(d)) => d.join("../training_solutions_rev1.csv"),
                (None, None) => {
                    bail!("--fill-mean with --pred needs --train-labels CSV (or --ids DIR inside a Kaggle layout)")
                }
            };
            let sol = gz_schema::read_solutions(&labels).with_context(|| {
                format!(
                    "reading the training labels for --fill-mean from {} (pass --train-labels CSV to read another file)",
                    labels.display()
                )
            })?;
            if sol.is_empty() {
                bail!(
                    "{}: no rows (a header only): --fill-mean needs the training labels to average (pass \
                     --train-labels CSV to read another file)",
                    labels.display()
                );
            }
            Some(gz_eval::baselines::mean_row(&sol.values)?.to_vec())
        } else {
            None
        };
        (pred, mean)
    } else if !args.runs.is_empty() {
        let src = SourceArgs {
            runs: args.runs.clone(),
            cache: args.cache.clone(),
            images: args.images.clone(),
            tta: args.tta.clone(),
            device: args.device.clone(),
            batch: args.batch,
            fill_mean: args.fill_mean,
        };
        if let (None, Some(cache)) = (&ids, &args.cache) {
            // no ids folder: the cache knows the test images, the ones prep skipped included
            // (a short submission passed as complete; `predict` names them and refuses them
            // without --fill-mean, before predicting)
            ids = Some(cache_test_ids(cache)?.0);
        }
        let p = predict(&src, None)?;
        // Unreadable images (only allowed with --fill-mean) are missing rows here; the ids
        // folder makes `write_submission` fill and list them.
        let mean = args.fill_mean.then(|| p.train_mean.clone());
        (p.rows, mean)
    } else {
        bail!("give --pred FILE, or --run RUN with --cache/--images, or --check FILE");
    };
    if ids.is_none() {
        eprintln!(
            "warning: no --ids folder: the submission cannot be checked for completeness against the test images"
        );
    }
    let a = write_submission(&out, &pred, ids.as_deref(), mean.as_deref()).context("writing the submission")?;
    for id in &a.filled {
        eprintln!("filled with the training mean: {id}");
    }
    println!(
        "{}, {} clipped to [0, 1], {} filled with the training mean",
        super::count(a.rows.len(), "row"),
        super::count(a.clipped, "value"),
        super::count(a.filled.len(), "row")
    );
    println!("submission: {}", out.display());
    Ok(())
}

/// The folder of test JPEGs a submission must match, with the flag that named it: `--ids`, or
/// else `--images`.
fn ids_source(args: &Args) -> Option<(&'static str, &PathBuf)> {
    match (&args.ids, &args.images) {
        (Some(d), _) => Some(("--ids", d)),
        (None, Some(d)) => Some(("--images", d)),
        (None, None) => None,
    }
}

/// A test image `gz prep` skipped: its GalaxyID, its path in the manifest and the reason.
pub(crate) struct SkippedImage {
    pub id: u64,
    pub path: String,
    pub reason: String,
}

/// The GalaxyIDs of a cache's test images: its test split's and those of the test images
/// `gz prep` skipped (unreadable: recorded in the manifest), with the skipped ones' paths and
/// reasons.
pub(crate) fn cache_test_ids(dir: &Path) -> anyhow::Result<(Vec<u64>, Vec<SkippedImage>)> {
    let cache = super::open_cache(dir)?;
    let mut ids: Vec<u64> = cache.test().map(|t| t.ids().to_vec()).unwrap_or_default();
    let mut seen: std::collections::HashSet<u64> = ids.iter().copied().collect();
    let mut skipped = Vec::new();
    for s in cache.extra()["skipped"].as_array().into_iter().flatten() {
        let (Some(path), Some(reason)) = (s["path"].as_str(), s["reason"].as_str()) else {
            continue;
        };
        // `images_test_rev1/<GalaxyID>.jpg` (older caches: the dataset's path in front); a
        // file not named so was never a test row
        let p = Path::new(path);
        if p.parent().and_then(Path::file_name) != Some(gz_preprocess::dataset::TEST_DIR.as_ref()) {
            continue;
        }
        let id = p
            .file_stem()
            .and_then(|n| n.to_str())
            .filter(|_| {
                p.extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg"))
            })
            .and_then(|stem| stem.parse::<u64>().ok());
        if let Some(id) = id {
            if seen.insert(id) {
                ids.push(id);
                skipped.push(SkippedImage {
                    id,
                    path: path.to_string(),
                    reason: reason.to_string(),
                });
            }
        }
    }
    ids.sort_unstable();
    Ok((ids, skipped))
}

fn read_ids(source: Option<(&str, &PathBuf)>) -> anyhow::Result<Option<Vec<u64>>> {
    source
        .map(|(flag, d)| ids_from_dir(d).with_context(|| format!("reading the test ids ({flag}) from {}", d.display())))
        .transpose()
}

fn run_check(file: &Path, ids_source: Option<(&str, &PathBuf)>) -> anyhow::Result<()> {
    let ids = read_ids(ids_source)?;
    let rep = check(file, ids.as_deref())?;
    for w in &rep.warnings {
        eprintln!("warning: {}: {w}", file.display());
    }
    if rep.is_ok() {
        // without the test images, a file cut short at a line end reads as valid: said so
        let versus = ids.as_ref().map_or(
            " (not checked for completeness: --ids FOLDER names the test images)".to_string(),
            |i| format!(", complete for the {}", super::count(i.len(), "test image")),
        );
        println!(
            "{}: valid submission, {}{versus}",
            file.display(),
            super::count(rep.rows, "row")
        );
        return Ok(());
    }
    print!("{}", rep.describe());
    let summary: Vec<String> = rep.counts.iter().map(|(k, &n)| k.counted(n)).collect();
    bail!(
        "{}: {}: {}",
        file.display(),
        super::count(rep.total(), "problem"),
        summary.join(", ")
    )
}
