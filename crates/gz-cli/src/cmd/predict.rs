//! `gz predict`: vote fractions for test images from one checkpoint or an ensemble, with
//! optional test-time augmentation, written as a CSV in the submission layout (unclipped).
//!
//! Sources: a shard cache's test split (`--cache`, the checkpoint's preprocessing must match the
//! cache's: refused otherwise with both named) or a folder of JPEGs (`--images`, preprocessed on
//! the fly with each checkpoint's own config: an ensemble of checkpoints that take different
//! inputs prepares the images once per input and averages over all members). A folder of
//! `<GalaxyID>.jpg` files gives rows keyed by GalaxyID, as a submission; any other names
//! (an astronomer's own cutouts, `NGC1300.jpg`) give rows keyed by file name (first column
//! `file`). An unreadable JPEG stops the command before any
//! file is written, unless `--fill-mean` fills its row with the training mean (from the
//! checkpoint) and lists it. Also the shared helpers `gz submit --run` uses.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use gz_eval::predict::{
    keys_for, list_jpegs, pooled_conditional_variance, predict_jpegs, predict_split, Failure, JpegPredictions, SpreadOf,
};
use gz_eval::tta::{Ensemble, Predictor, TtaConfig};
use gz_model::checkpoint::LoadedModel;
use gz_schema::Solutions;

/// Test-time augmentation flags (shared by `gz predict`, `gz eval`, `gz submit --run`).
#[derive(Debug, Clone, clap::Args)]
pub struct TtaArgs {
    /// Test-time augmentation preset: 1 (none), 2, 4, 8 (4 rotations × 2 flips) or 60
    /// (10 rotations × 2 flips × zooms 1/1.2, 1, 1.2, as Dieleman et al.).
    #[arg(long, default_value_t = 1)]
    pub tta: usize,
    /// Override the preset's number of rotations (evenly spaced over 360°).
    #[arg(long)]
    pub tta_rotations: Option<usize>,
    /// Override the preset: also average mirrored views (true/false).
    #[arg(long)]
    pub tta_flips: Option<bool>,
    /// Override the preset's zooms, comma-separated (e.g. 0.8333,1,1.2).
    #[arg(long, value_delimiter = ',')]
    pub tta_scales: Option<Vec<f32>>,
}

impl TtaArgs {
    /// The prediction options given, by flag name, with the command's `--device` and
    /// `--batch`: for the modes that predict nothing (`gz submit --pred`/`--check`, `gz eval
    /// --pred`) to refuse. Defaults are indistinguishable from absent values, which is
    /// harmless: they change nothing.
    pub fn given_with(&self, device: &str, batch: usize) -> Vec<&'static str> {
        [
            ("--tta", self.tta != 1),
            ("--tta-rotations", self.tta_rotations.is_some()),
            ("--tta-flips", self.tta_flips.is_some()),
            ("--tta-scales", self.tta_scales.is_some()),
            ("--device", device != "cpu"),
            ("--batch", batch != 64),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect()
    }

    /// The validated TTA grid.
    pub fn config(&self) -> anyhow::Result<TtaConfig> {
        let mut t = TtaConfig::preset(self.tta)?;
        if let Some(r) = self.tta_rotations {
            t.rotations = r;
        }
        if let Some(f) = self.tta_flips {
            t.flips = f;
        }
        if let Some(s) = &self.tta_scales {
            t.scales = s.clone();
        }
        t.validate()?;
        Ok(t)
    }
}

/// Where the images come from and which checkpoints run on them.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// Checkpoint: a run directory (its best.safetensors) or a .safetensors file. Repeat for
    /// an ensemble (uniform average).
    #[arg(long = "run", required = true)]
    pub runs: Vec<PathBuf>,
    /// Shard cache directory (from `gz prep`); its test split is predicted.
    #[arg(long, conflicts_with = "images")]
    pub cache: Option<PathBuf>,
    /// A JPEG, or a folder of JPEGs, preprocessed with each checkpoint's own config (an
    /// ensemble may mix input sizes and crops). Named <GalaxyID>.jpg: rows keyed by GalaxyID (as a submission);
    /// any other names: rows keyed by file name (first column `file`).
    #[arg(long)]
    pub images: Option<PathBuf>,
    #[command(flatten)]
    pub tta: TtaArgs,
    /// cpu, cuda, cuda:N, or auto (CUDA 0 when built with CUDA and a GPU is present, else the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Images per forward pass (each under every TTA view).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Fill the row of an unreadable image with the training mean (listed on stderr)
    /// instead of failing; with --cache, that of each test image `gz prep` skipped (refused
    /// without it).
    #[arg(long)]
    pub fill_mean: bool,
}

/// Arguments of `gz predict`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Output CSV (GalaxyID, or the file name for --images not named by GalaxyID, + 37
    /// columns), written atomically (missing folders are created); `-` writes it to standard
    /// output.
    #[arg(long)]
    pub out: PathBuf,
    /// Write per-question fractions instead of Kaggle's: each answer's share of the votes on
    /// its question (each question sums to 1, as Galaxy Zoo catalogues give them); a question
    /// the model says under 1 % of volunteers would reach gets empty cells.
    #[arg(long)]
    pub conditional: bool,
    /// Also write, in the same layout, each galaxy's spread: per answer, the standard deviation
    /// of the predictions the output averages (its TTA views × checkpoints; needs more than
    /// one). How much the prediction depends on orientation and checkpoint: a disagreement
    /// measure, not a calibrated uncertainty (`gz eval` says how it ranks the errors). With
    /// --conditional, of the per-question fractions: the RMS deviation of each view's and
    /// checkpoint's from the ones written, over those that reach the question. A filled
    /// row's cells are empty. `-` writes it to standard output.
    #[arg(long, value_name = "FILE")]
    pub spread: Option<PathBuf>,
}

/// A progress bar on stderr, hidden when stderr is not a terminal.
pub fn progress_bar(len: usize, what: &str) -> indicatif::ProgressBar {
    let pb = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(len as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({eta})") {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// Predictions with the rows that had to be filled.
pub struct Predicted {
    pub rows: Solutions,
    /// Test images that could not be predicted (filled with `train_mean` when allowed).
    pub failures: Vec<Failure>,
    /// The first checkpoint's training-set mean.
    pub train_mean: Vec<f32>,
    /// TTA views used.
    pub views: usize,
    /// File mode (`--images` not all named `<GalaxyID>.jpg`): the row keys are positions into
    /// these file names.
    pub names: Option<Vec<String>>,
    /// When asked for: the variance of each predicted row's views' and members' predictions
    /// (rows of `rows`' keys; filled rows have none).
    pub var: Option<Solutions>,
}

/// Loads the checkpoints and predicts the source's test images, with the spread of the views'
/// and members' predictions when `spread`.
pub fn predict(src: &SourceArgs, spread: Option<SpreadOf>) -> anyhow::Result<Predicted> {
    if src.batch == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    if src.cache.is_none() && src.images.is_none() {
        // (said here rather than by the argument parser, which named --cache alone)
        bail!("give --cache DIR (a shard cache's test split) or --images DIR (JPEGs) to predict");
    }
    let tta = src.tta.config()?;
    // before loading anything: one view of one checkpoint has nothing to spread
    if spread.is_some() && tta.n_views() * src.runs.len() < 2 {
        bail!(
            "--spread needs more than one prediction per image to spread: pass --tta 2 or more (e.g. --tta 8), or \
             several --run"
        );
    }
    // the test images `gz prep` could not read have no place in the cache but a row in the
    // output: named, and refused without --fill-mean, before any work
    let skipped = match &src.cache {
        Some(dir) => super::submit::cache_test_ids(dir)?.1,
        None => Vec::new(),
    };
    for s in &skipped {
        eprintln!(
            "note: gz prep skipped the test image {} ({}): {}",
            s.path,
            s.reason,
            if src.fill_mean {
                "its row gets the training mean"
            } else {
                "its row needs --fill-mean (the training mean), or fix the image and prep again"
            }
        );
    }
    if !skipped.is_empty() && !src.fill_mean {
        bail!(
            "{} of the cache's test images could not be read by gz prep (named above); nothing written (pass \
             --fill-mean to fill {} with the training mean)",
            skipped.len(),
            if skipped.len() == 1 { "its row" } else { "their rows" }
        );
    }
    // (the error names the device asked for)
    let device = gz_model::device::select_device(&src.device)?;
    // JPEGs are prepared for each checkpoint's own preprocessing; a cache holds one
    let models = if src.images.is_some() {
        gz_eval::eval::load_checkpoints(&src.runs, &device)?
    } else {
        gz_eval::eval::load_runs(&src.runs, &device)?
    };
    super::warn_repeated_checkpoints(&models);
    // the rows --fill-mean fills: the members' training means averaged, as their predictions
    // are (it was the first --run's, so the filled rows changed with the order of the runs)
    let train_mean: Vec<f32> = (0..models[0].sidecar().train_mean.len())
        .map(|k| {
            let sum: f64 = models
                .iter()
                .map(|m| m.sidecar().train_mean.get(k).copied().unwrap_or(0.0))
                .sum();
            (sum / models.len() as f64) as f32
        })
        .collect();
    if members_saw_other_images(models.iter().map(|m| m.sidecar())) {
        eprintln!(
            "note: the checkpoints were trained on different images or labels (their training fingerprints \
             differ): their \
             average mixes models of different data{}",
            if src.fill_mean {
                ", and the rows --fill-mean fills take the average of their training means"
            } else {
                ""
            }
        );
    }
    let members: Vec<&dyn Predictor> = models.iter().map(|m| m as &dyn Predictor).collect();
    let ensemble = Ensemble { members };
    eprintln!(
        "predicting with {}, {} per image on {}",
        super::count(models.len(), "checkpoint"),
        super::count(tta.n_views(), "TTA view"),
        // the device by its own name (`cpu`, `cuda:0`), not as typed (`Auto`)
        gz_model::device::device_name(&device)
    );
    let mut names = None;
    let (rows, var, failures) = if let Some(cache_dir) = &src.cache {
        let cache = super::open_cache(cache_dir)?;
        for (m, run) in models.iter().zip(&src.runs) {
            gz_eval::eval::check_cache(m, run, &cache)?;
        }
        let Some(test) = cache.test() else {
            bail!("{}", super::no_test_split(cache_dir));
        };
        if test.is_empty() {
            bail!(
                "the test split of cache {} holds no images ({})",
                cache_dir.display(),
                if skipped.is_empty() {
                    "was images_test_rev1/ empty when it was prepared?".to_string()
                } else {
                    format!(
                        "gz prep could read none of its {}: named above",
                        match skipped.len() {
                            1 => "one test image".to_string(),
                            n => format!("{n} test images"),
                        }
                    )
                }
            );
        }
        // the images' bits against their checksums (opening reads only headers, ids and labels)
        test.verify()
            .with_context(|| format!("checking the test split of {}", cache_dir.display()))?;
        let pb = progress_bar(test.len(), "predict");
        let out = predict_split(&ensemble, test, None, &tta, src.batch, &device, spread, &|n| {
            pb.set_position(n as u64)
        })?;
        pb.finish_and_clear();
        let with_ids = |values| Solutions {
            ids: test.ids().to_vec(),
            values,
        };
        // (said above, with their reasons)
        let failures = skipped
            .into_iter()
            .map(|s| Failure {
                path: s.path.into(),
                key: s.id,
                reason: s.reason,
            })
            .collect();
        (with_ids(out.mean), out.var.map(with_ids), failures)
    } else if let Some(dir) = &src.images {
        let (out, n) = predict_folder(&models, dir, &tta, src.batch, &device, spread)?;
        names = n;
        (out.rows, out.var, out.failures)
    } else {
        bail!("give --cache DIR (a shard cache's test split) or --images DIR (a folder of <GalaxyID>.jpg) to predict");
    };
    if rows.is_empty() && !failures.is_empty() {
        if failures.len() == 1 {
            bail!(
                "the one image could not be read: nothing could be predicted ({}: {}); nothing written",
                super::shown(&failures[0].path),
                failures[0].reason
            );
        }
        for f in &failures {
            eprintln!("unreadable image {}: {}", super::shown(&f.path), f.reason);
        }
        bail!(
            "none of the {} images could be predicted (each named above with its reason); nothing written",
            failures.len()
        );
    }
    if !failures.is_empty() && src.images.is_some() {
        for f in &failures {
            eprintln!("unreadable image {}: {}", super::shown(&f.path), f.reason);
        }
        if !src.fill_mean {
            bail!(
                "{} could not be predicted; nothing written (pass --fill-mean to fill {} with the training mean and \
                 list {})",
                super::count(failures.len(), "image"),
                if failures.len() == 1 { "its row" } else { "their rows" },
                if failures.len() == 1 { "it" } else { "them" }
            );
        }
    }
    Ok(Predicted {
        rows,
        failures,
        train_mean,
        views: tta.n_views(),
        names,
        var,
    })
}

fn predict_folder(
    models: &[LoadedModel],
    dir: &Path,
    tta: &TtaConfig,
    batch: usize,
    device: &gz_eval::Device,
    spread: Option<SpreadOf>,
) -> anyhow::Result<(JpegPredictions, Option<Vec<String>>)> {
    // one image named by itself, or the JPEGs of a folder
    let paths = if dir.is_file() {
        vec![dir.to_path_buf()]
    } else if dir.exists() && !dir.is_dir() {
        bail!(
            "--images {}: not a regular file (a named pipe, socket or device) nor a folder: --images takes a folder \
             of JPEGs or one JPEG",
            dir.display()
        );
    } else {
        list_jpegs(dir)?
    };
    if paths.is_empty() {
        let sub = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_type().is_ok_and(|t| t.is_dir()));
        bail!(
            "no .jpg files in {}{}",
            dir.display(),
            if sub {
                " (images are read from the top level of the folder only, not from its subfolders)"
            } else {
                ""
            }
        );
    }
    let keys = keys_for(&paths)?;
    if let Some(names) = &keys.names {
        let other = paths.iter().find(|p| gz_eval::predict::galaxy_id(p).is_none());
        eprintln!(
            "{} is not named <GalaxyID>.jpg: the {} {} named by file (first column `file`)",
            other.map_or_else(|| "an image".into(), super::shown),
            super::count(names.len(), "row"),
            if names.len() == 1 { "is" } else { "are" }
        );
    }
    // the members by the input they take, in order of first appearance: the images are
    // prepared once for each group
    let mut groups: Vec<Vec<&LoadedModel>> = Vec::new();
    for m in models {
        match groups
            .iter_mut()
            .find(|g| gz_eval::eval::same_input(g[0].sidecar(), m.sidecar()))
        {
            Some(g) => g.push(m),
            None => groups.push(vec![m]),
        }
    }
    if groups.len() == 1 {
        let (out, grey) = predict_group(&groups[0], &paths, &keys.keys, tta, batch, device, spread, "predict")?;
        warn_greyscale(grey);
        return Ok((out, keys.names));
    }
    // a conditional spread is around the whole ensemble's fractions, known only at the end:
    // each group gives the moments of its predictions' fractions, pooled exactly below
    let conditional = spread == Some(SpreadOf::Conditional);
    let group_spread = if conditional {
        Some(SpreadOf::ConditionalMoments)
    } else {
        spread
    };
    eprintln!(
        "the ensemble takes {} different inputs: the images are prepared and predicted once for each",
        groups.len()
    );
    // the uniform average over all members: each group's average weighted by its size
    let mut sum: std::collections::HashMap<u64, (Vec<f32>, usize)> = std::collections::HashMap::new();
    // with the spread: each group's (members, mean, variance) per row, pooled at the end
    let mut parts: std::collections::HashMap<u64, Vec<GroupMoments>> = std::collections::HashMap::new();
    // with the conditional spread: each group's (n, mean, m2) of the fractions per row
    let mut cond_parts: std::collections::HashMap<u64, Vec<[Vec<f32>; 3]>> = std::collections::HashMap::new();
    let mut failures: Vec<Failure> = Vec::new();
    let mut failed_paths: std::collections::HashSet<std::path::PathBuf> = std::collections::HashSet::new();
    for (gi, group) in groups.iter().enumerate() {
        let what = format!("predict ({}/{})", gi + 1, groups.len());
        let (out, grey) = predict_group(group, &paths, &keys.keys, tta, batch, device, group_spread, &what)?;
        if let Some([n, mean, m2]) = &out.cond {
            for (i, &id) in n.ids.iter().enumerate() {
                cond_parts
                    .entry(id)
                    .or_default()
                    .push([n.row(i).to_vec(), mean.row(i).to_vec(), m2.row(i).to_vec()]);
            }
        }
        let (rows, failed) = (out.rows, out.failures);
        if let Some(var) = &out.var {
            for (i, &id) in var.ids.iter().enumerate() {
                parts
                    .entry(id)
                    .or_default()
                    .push((group.len(), rows.row(i).to_vec(), var.row(i).to_vec()));
            }
        }
        if gi == 0 {
            // (every group reads the same files: said once)
            warn_greyscale(grey);
        }
        for (i, &id) in rows.ids.iter().enumerate() {
            let (acc, n) = sum.entry(id).or_insert_with(|| (vec![0.0; gz_schema::N_ANSWERS], 0));
            for (a, v) in acc.iter_mut().zip(rows.row(i)) {
                *a += group.len() as f32 * v;
            }
            *n += group.len();
        }
        for f in failed {
            if failed_paths.insert(f.path.clone()) {
                failures.push(f);
            }
        }
    }
    // rows every member predicted, in file order (an image that failed for any member has no
    // row from that member's group)
    let mut rows = Solutions::new();
    let mut var = spread.map(|_| Solutions::new());
    for &key in &keys.keys {
        if let Some((acc, n)) = sum.get(&key).filter(|(_, n)| *n == models.len()) {
            let row: Vec<f32> = acc.iter().map(|v| v / *n as f32).collect();
            if let Some(var) = &mut var {
                if conditional {
                    let p: Vec<(&[f32], &[f32], &[f32])> = cond_parts[&key]
                        .iter()
                        .map(|[n, mean, m2]| (n.as_slice(), mean.as_slice(), m2.as_slice()))
                        .collect();
                    var.push(key, &pooled_conditional_variance(&p, &gz_schema::conditional(&row)));
                } else {
                    var.push(key, &pooled_variance(&parts[&key], &row));
                }
            }
            rows.push(key, &row);
        }
    }
    Ok((
        JpegPredictions {
            rows,
            var,
            cond: None,
            failures,
        },
        keys.names,
    ))
}

/// A spread CSV cell: the standard deviation of a variance (a rounding hair below 0 is 0; a
/// NaN from a diverged model stays NaN, not the 0 of `max(0.0)`: perfect agreement).
fn std_dev(var: f32) -> f32 {
    if var < 0.0 {
        0.0
    } else {
        var.sqrt()
    }
}

/// The spread CSV's cells for `rows` in their order, looked up by key in `var` (a row `var`
/// lacks, one filled with the training mean, gets empty cells). With `conditional`, a
/// question whose per-question fractions are empty in the predictions (too few volunteers
/// reach it) has empty cells here too, and so does one the average reaches but none of the
/// views and checkpoints does (a NaN variance beside finite fractions).
fn spread_cells(rows: &Solutions, var: &Solutions, conditional: bool) -> Vec<Vec<Option<f32>>> {
    let index = var.index();
    rows.ids
        .iter()
        .enumerate()
        .map(|(i, id)| match index.get(id) {
            Some(&j) => {
                let shown = conditional.then(|| gz_schema::conditional(rows.row(i)));
                var.row(j)
                    .iter()
                    .enumerate()
                    .map(|(a, &v)| match &shown {
                        Some(c) if c[a].is_none() => None,
                        // fractions written but no view or checkpoint reaches the question (the
                        // average crossed the 1 % line by rounding): nothing to spread, not the
                        // NaN of a diverged model (whose fractions are NaN too)
                        Some(c) if v.is_nan() && c[a].is_some_and(f32::is_finite) => None,
                        _ => Some(std_dev(v)),
                    })
                    .collect()
            }
            None => vec![None; gz_schema::N_ANSWERS],
        })
        .collect()
}

/// One group's members, mean and variance of one row (for [`pooled_variance`]).
type GroupMoments = (usize, Vec<f32>, Vec<f32>);

/// The variance of all the predictions of several groups around their pooled `mean`, from each
/// group's (weight, mean, variance): Σ w (v + (m − mean)²) / Σ w (every group has the same views,
/// so a group weighs its number of members).
fn pooled_variance(groups: &[GroupMoments], mean: &[f32]) -> Vec<f32> {
    let total: usize = groups.iter().map(|g| g.0).sum();
    (0..mean.len())
        .map(|a| {
            let s: f64 = groups
                .iter()
                .map(|(w, m, v)| *w as f64 * (v[a] as f64 + (m[a] as f64 - mean[a] as f64).powi(2)))
                .sum();
            (s / total as f64) as f32
        })
        .collect()
}

/// Warns once, naming how many, when some of the JPEGs predicted were greyscale.
fn warn_greyscale(grey: usize) {
    if grey > 0 {
        eprintln!("warning: {}", super::prep::greyscale_warning(grey, None));
    }
}

/// The members of one group (same input) on every JPEG, prepared with their preprocessing;
/// also how many of them were greyscale JPEGs.
#[allow(clippy::too_many_arguments)] // reason: the one helper of predict_folder
fn predict_group(
    group: &[&LoadedModel],
    paths: &[std::path::PathBuf],
    keys: &[u64],
    tta: &TtaConfig,
    batch: usize,
    device: &gz_eval::Device,
    spread: Option<SpreadOf>,
    what: &str,
) -> anyhow::Result<(JpegPredictions, usize)> {
    let sidecar = group[0].sidecar();
    let cfg: gz_preprocess::PrepConfig = serde_json::from_value(sidecar.prep_config.clone()).with_context(|| {
        format!(
            "the checkpoint's prep_config is not a gz-preprocess PrepConfig: {}",
            sidecar.prep_config
        )
    })?;
    if cfg.hash() != sidecar.prep_config_hash {
        bail!(
            "the checkpoint's prep_config hashes to {} but the checkpoint says {}: it was made by another preprocessing \
             version, so raw images cannot be prepared the same way; use --cache with a cache of hash {}",
            cfg.hash(),
            sidecar.prep_config_hash,
            sidecar.prep_config_hash
        );
    }
    if cfg.shape() != sidecar.input_shape {
        bail!(
            "the checkpoint's prep_config makes {:?} inputs but its input_shape is {:?}: the sidecar is inconsistent \
             (edited by hand?)",
            cfg.shape(),
            sidecar.input_shape
        );
    }
    let members: Vec<&dyn Predictor> = group.iter().map(|m| *m as &dyn Predictor).collect();
    let ensemble = Ensemble { members };
    let grey = std::sync::atomic::AtomicUsize::new(0);
    // images whose crop is smaller than the input (enlarged): how many, and the smallest
    let small = std::sync::Mutex::new((0usize, None::<(u32, u32)>));
    let prep = |bytes: &[u8]| {
        let img = gz_preprocess::prep_jpeg(bytes, &cfg).map_err(|e| e.to_string())?;
        if gz_preprocess::jpeg_channels(bytes) == Some(1) {
            grey.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some((w, h)) = gz_preprocess::jpeg_size(bytes).filter(|&(w, h)| enlarged(&cfg, w, h)) {
            let mut s = small.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            s.0 += 1;
            if s.1.is_none_or(|(sw, sh)| w.min(h) < sw.min(sh)) {
                s.1 = Some((w, h));
            }
        }
        Ok(img)
    };
    let pb = progress_bar(paths.len(), what);
    let out = predict_jpegs(
        &ensemble,
        paths,
        keys,
        &prep,
        sidecar.input_shape,
        tta,
        batch,
        device,
        spread,
        &|n| pb.set_position(n as u64),
    )?;
    pb.finish_and_clear();
    let (n, smallest) = small.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((w, h)) = smallest {
        eprintln!(
            "warning: {} so small that {} enlarged to the model's {}×{} px input ({}{w}×{h} px, cropped to {}×{} \
             px): {} less detail than the 424-px images the model learnt from, so {} predictions may be unreliable",
            if n == 1 {
                "1 image is".to_string()
            } else {
                format!("{n} images are")
            },
            if n == 1 {
                "its central crop is"
            } else {
                "their central crops are"
            },
            cfg.size,
            cfg.size,
            if n == 1 { "" } else { "the smallest: " },
            crop_px(&cfg, w),
            crop_px(&cfg, h),
            if n == 1 { "it holds" } else { "they hold" },
            if n == 1 { "its" } else { "their" },
        );
    }
    Ok((out, grey.into_inner()))
}

/// The pixels of a `side`-px image axis the crop keeps (the crop is in pixels of a 424-px image:
/// the same fraction of any other).
fn crop_px(cfg: &gz_preprocess::PrepConfig, side: u32) -> u32 {
    (side as u64 * cfg.crop as u64 / gz_preprocess::REFERENCE_SIZE as u64).max(1) as u32
}

/// Whether a `w`×`h` image's crop is smaller than the model's input on either axis, so that
/// preprocessing enlarges it.
fn enlarged(cfg: &gz_preprocess::PrepConfig, w: u32, h: u32) -> bool {
    crop_px(cfg, w.min(h)) < cfg.size
}

/// Adds the training-mean rows of the failures that have an id.
pub fn fill_failures(p: &mut Predicted) -> anyhow::Result<Vec<u64>> {
    if p.train_mean.len() != gz_schema::N_ANSWERS {
        bail!("the checkpoint has no 37-value training mean to fill with");
    }
    let mut filled = Vec::new();
    for f in &p.failures {
        p.rows.push(f.key, &p.train_mean);
        filled.push(f.key);
    }
    Ok(filled)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let stdout = Path::new("-");
    if args.out != stdout {
        // before predicting, not after it
        super::check_output("--out", &args.out, false)?;
    } else {
        super::check_stdout("--out")?;
    }
    if args.spread.as_deref() == Some(stdout) {
        super::check_stdout("--spread")?;
    }
    if let Some(sp) = &args.spread {
        if sp == stdout && args.out == stdout {
            bail!("--out - and --spread - would both go to standard output: give one of them a file");
        }
        if super::same_file(sp, &args.out) {
            bail!(
                "--spread {} and --out {} name the same file: the spread would overwrite the predictions",
                sp.display(),
                args.out.display()
            );
        }
        if sp != stdout {
            super::check_output("--spread", sp, false)?;
        }
    }
    // nor may either replace what the command reads, or a file gz would not have written
    let src = &args.source;
    let inputs: Vec<PathBuf> = super::run_inputs(&src.runs)
        .into_iter()
        .chain(src.images.iter().filter(|p| p.is_file()).cloned())
        .collect();
    let folders: Vec<&Path> = src.cache.iter().map(PathBuf::as_path).collect();
    let images = src.images.as_deref().filter(|p| p.is_dir());
    super::check_not_an_input("--out", &args.out, &inputs, &folders, images)?;
    if let Some(sp) = &args.spread {
        super::check_not_an_input("--spread", sp, &inputs, &folders, images)?;
    }
    for (flag, path) in [("--out", Some(&args.out)), ("--spread", args.spread.as_ref())] {
        if let Some(path) = path.filter(|p| *p != stdout) {
            super::check_replaceable(flag, path)?;
            super::check_writable(flag, path, false)?;
        }
    }
    let spread_of = if args.conditional {
        SpreadOf::Conditional
    } else {
        SpreadOf::Kaggle
    };
    let mut p = predict(&args.source, args.spread.as_ref().map(|_| spread_of))?;
    let filled = fill_failures(&mut p)?;
    for &key in &filled {
        match &p.names {
            Some(names) => eprintln!("filled with the training mean: {}", super::shown(&names[key as usize])),
            None => eprintln!("filled with the training mean: {key}"),
        }
    }
    // in GalaxyID (or file name) order, filled rows in their places (as a submission is)
    let rows = p.rows.sorted_by_id();
    let label = |i: usize| match &p.names {
        Some(names) => names[rows.ids[i] as usize].clone(),
        None => rows.ids[i].to_string(),
    };
    let first_column = if p.names.is_some() { "file" } else { "GalaxyID" };
    let table: Vec<(String, Vec<Option<f32>>)> = (0..rows.len())
        .map(|i| {
            let cells = if args.conditional {
                gz_schema::conditional(rows.row(i)).to_vec()
            } else {
                rows.row(i).iter().map(|&v| Some(v)).collect()
            };
            (label(i), cells)
        })
        .collect();
    let summary = format!(
        "{} ({} filled with the training mean), {}{}",
        super::count(p.rows.len(), "row"),
        filled.len(),
        super::count(p.views, "TTA view"),
        if args.conditional {
            ", per-question fractions"
        } else {
            ""
        }
    );
    // the spread's rows in the same order, by key (a filled row has none: empty cells)
    let spread_table = p.var.as_ref().map(|var| {
        spread_cells(&rows, var, args.conditional)
            .into_iter()
            .enumerate()
            .map(|(i, cells)| (label(i), cells))
            .collect::<Vec<(String, Vec<Option<f32>>)>>()
    });
    // what is said goes to stderr when a CSV goes to stdout (one galaxy's answers into a pipe)
    let to_stdout = args.out == stdout || args.spread.as_deref() == Some(stdout);
    let say = |line: String| {
        if to_stdout {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    // files first, staged together and then renamed into place (one that cannot be written,
    // a full disk, leaves neither: the paths were checked before any work); standard output
    // last, so that nothing reaches a pipe before the files are whole
    let mut outputs = vec![(args.out.as_path(), table.as_slice(), "predictions")];
    if let (Some(path), Some(t)) = (&args.spread, &spread_table) {
        outputs.push((path.as_path(), t.as_slice(), "spread"));
    }
    let mut staged = Vec::new();
    for (path, t, _) in outputs.iter().filter(|(p, _, _)| *p != stdout) {
        let text = gz_eval::predict::table_csv(first_column, t)?;
        // the error names the file (and the reason) itself
        staged.push(gz_schema::stage_atomic(path, text.as_bytes()).context("writing the predictions")?);
    }
    for s in staged {
        s.commit().context("writing the predictions")?;
    }
    for (_, t, what) in outputs.iter().filter(|(p, _, _)| *p == stdout) {
        let text = gz_eval::predict::table_csv(first_column, t)?;
        use std::io::Write as _;
        std::io::stdout()
            .write_all(text.as_bytes())
            .with_context(|| format!("writing the {what} to standard output"))?;
    }
    say(summary);
    if args.out != stdout {
        say(format!("predictions: {}", args.out.display()));
    }
    if let Some(path) = args.spread.as_deref().filter(|p| *p != stdout) {
        say(format!("spread: {}", path.display()));
    }
    Ok(())
}

/// Whether an ensemble's members were trained on different galaxies or labels: by the
/// preprocessing-free data fingerprints where every member has one (runs of the same images
/// prepared at two sizes are one set of images), else by the training caches' content
/// fingerprints where the members share a preprocessing (where it differs, those differ
/// anyway, and older runs say nothing more).
fn members_saw_other_images<'a>(sidecars: impl Iterator<Item = &'a gz_model::checkpoint::Sidecar> + Clone) -> bool {
    use std::collections::BTreeSet;
    let data: BTreeSet<Option<&str>> = sidecars.clone().map(|s| s.train_data_fingerprint.as_deref()).collect();
    if !data.contains(&None) {
        return data.len() > 1;
    }
    let preps: BTreeSet<&str> = sidecars.clone().map(|s| s.prep_config_hash.as_str()).collect();
    let prints: BTreeSet<Option<&str>> = sidecars.map(|s| s.train_fingerprint.as_deref()).collect();
    preps.len() == 1 && prints.len() > 1 && !prints.contains(&None)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::same_file;
    use super::{pooled_variance, spread_cells, std_dev};

    /// The spread's rows follow the predictions' (sorted, filled rows among them) by key, not
    /// by position.
    #[test]
    fn spread_rows_follow_the_prediction_rows_by_key() {
        let n = gz_schema::N_ANSWERS;
        let mut rows = gz_schema::Solutions::new();
        let mut var = gz_schema::Solutions::new();
        // predicted in file order 30, 10; 20 failed and was filled (pushed last)
        for (id, v) in [(30, 0.09f32), (10, 0.01)] {
            rows.push(id, &vec![0.5; n]);
            var.push(id, &vec![v; n]);
        }
        rows.push(20, &vec![0.5; n]);
        let rows = rows.sorted_by_id();
        let cells = spread_cells(&rows, &var, false);
        assert_eq!(rows.ids, vec![10, 20, 30]);
        assert_eq!(cells.len(), 3);
        assert!((cells[0][0].unwrap() - 0.1).abs() < 1e-6, "{:?}", cells[0][0]);
        assert!(cells[1].iter().all(Option::is_none));
        assert!((cells[2][36].unwrap() - 0.3).abs() < 1e-6, "{:?}", cells[2][36]);
    }

    /// Per-question spreads are empty where the per-question fractions are (a question under
    /// 1 % of volunteers reach), whatever the variance says there.
    #[test]
    fn conditional_spread_cells_are_empty_where_the_fractions_are() {
        let n = gz_schema::N_ANSWERS;
        let mut row = vec![0.0f32; n];
        // Q1: all smooth (0.995) or star (0.005): Q2 (edge-on, reached by disks) is unreached
        row[0] = 0.995;
        row[2] = 0.005;
        let mut rows = gz_schema::Solutions::new();
        rows.push(1, &row);
        let mut var = gz_schema::Solutions::new();
        var.push(1, &vec![0.04; n]);
        let shown = gz_schema::conditional(&row);
        let cells = spread_cells(&rows, &var, true);
        assert!(shown[3].is_none() && cells[0][3].is_none() && cells[0][4].is_none());
        assert!(shown[0].is_some() && (cells[0][0].unwrap() - 0.2).abs() < 1e-6);
        for (c, s) in cells[0].iter().zip(&shown) {
            assert_eq!(c.is_none(), s.is_none());
        }
        // the Kaggle spread has every cell
        assert!(spread_cells(&rows, &var, false)[0].iter().all(Option::is_some));
    }

    /// The average reaches a question (by rounding at the 1 % line) that none of the views
    /// reaches: `conditional_variance` has no deviation there (NaN); the cell is empty, not the
    /// NaN of a diverged model. A diverged model's NaN fractions keep their NaN spread.
    #[test]
    fn conditional_spread_reached_by_the_average_only_is_empty_not_nan() {
        let n = gz_schema::N_ANSWERS;
        // three views, each just under 1 % on Q2 (disks: answers 1 and then 3, 4); the f32
        // average of their shares crosses 1 % (found by search, sum then × f32(1/3) as
        // `predict_tta`)
        let views: [[f32; 2]; 3] = [
            [0.005442253, 0.004557746],
            [0.00245098, 0.007549019],
            [0.008082633, 0.001917366],
        ];
        let mut all = Vec::new();
        for v in &views {
            let mut r = vec![0.0f32; n];
            r[0] = 0.99;
            r[1] = v[0] + v[1];
            r[3] = v[0];
            r[4] = v[1];
            assert!(gz_schema::conditional(&r)[3].is_none(), "{:?}", &r[..5]);
            all.push(r);
        }
        let third = (1.0f64 / 3.0) as f32;
        let mean: Vec<f32> = (0..n).map(|a| (all[0][a] + all[1][a] + all[2][a]) * third).collect();
        let shown = gz_schema::conditional(&mean);
        assert!(shown[3].is_some_and(f32::is_finite), "{:?}", &mean[..5]);
        let v = gz_eval::predict::conditional_variance(&mean, &all);
        assert!(v[3].is_nan() && v[4].is_nan());
        let mut rows = gz_schema::Solutions::new();
        rows.push(1, &mean);
        let mut var = gz_schema::Solutions::new();
        var.push(1, &v);
        let cells = spread_cells(&rows, &var, true);
        assert_eq!((cells[0][3], cells[0][4]), (None, None), "{:?}", &cells[0][..5]);
        assert!(cells[0][0].is_some_and(f32::is_finite));
        // a diverged model: NaN fractions, NaN spread, written NaN
        let mut bad = mean.clone();
        bad[3] = f32::NAN;
        let mut rows = gz_schema::Solutions::new();
        rows.push(1, &bad);
        let mut var = gz_schema::Solutions::new();
        var.push(1, &vec![f32::NAN; n]);
        let cells = spread_cells(&rows, &var, true);
        assert!(cells[0][3].is_some_and(f32::is_nan) && cells[0][4].is_some_and(f32::is_nan));
    }

    #[test]
    fn a_diverged_models_spread_is_nan_not_zero() {
        assert!(std_dev(f32::NAN).is_nan());
        assert_eq!(std_dev(-1e-9), 0.0);
        assert_eq!(std_dev(0.25), 0.5);
    }

    #[test]
    fn the_same_file_under_two_spellings() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir(dir.join("sub")).unwrap();
        let p = dir.join("p.csv");
        assert!(same_file(&p, &p));
        assert!(same_file(&p, &dir.join("sub").join("..").join("p.csv")));
        assert!(!same_file(&p, &dir.join("s.csv")));
        assert!(!same_file(&p, &dir.join("sub").join("p.csv")));
        // a folder not made yet: compared as written, made absolute
        let new = dir.join("new").join("p.csv");
        assert!(same_file(&new, &dir.join("new").join(".").join("p.csv")));
        assert!(!same_file(&new, &p));
        let here = std::env::current_dir().unwrap();
        assert!(same_file(Path::new("p.csv"), Path::new("./p.csv")));
        assert!(same_file(Path::new("p.csv"), &here.join("p.csv")));
        // a symbolic link, to a file not written yet (the writers follow it) or written, and
        // a link to the link; a hard link
        #[cfg(unix)]
        {
            let link = dir.join("l.csv");
            std::os::unix::fs::symlink("p.csv", &link).unwrap();
            assert!(same_file(&link, &p) && same_file(&p, &link));
            std::os::unix::fs::symlink(&link, dir.join("ll.csv")).unwrap();
            assert!(same_file(&dir.join("ll.csv"), &p));
            std::fs::write(&p, "x").unwrap();
            assert!(same_file(&link, &p));
            // a hard link is another name: a write replaces one name, not the other's content
            std::fs::hard_link(&p, dir.join("h.csv")).unwrap();
            assert!(!same_file(&dir.join("h.csv"), &p));
            // a folder not made yet below a linked one, and `..` below it
            std::os::unix::fs::symlink(dir.join("sub"), dir.join("lsub")).unwrap();
            assert!(same_file(&dir.join("lsub/new/x.csv"), &dir.join("sub/new/x.csv")));
            assert!(same_file(&dir.join("lsub/new/../x.csv"), &dir.join("sub/x.csv")));
            std::fs::write(dir.join("s.csv"), "x").unwrap();
            assert!(!same_file(&link, &dir.join("s.csv")));
        }
    }

    /// Groups of an ensemble that take different inputs are predicted apart and pooled: the
    /// pooled variance is the variance of all their predictions together.
    #[test]
    fn pooled_variance_is_the_variance_of_everything() {
        // three groups' predictions of one answer (each value one view of one member)
        let groups: [&[f64]; 3] = [&[0.1, 0.3], &[0.2, 0.6, 0.7, 0.9], &[0.5, 0.5]];
        let stats = |xs: &[f64]| {
            let m = xs.iter().sum::<f64>() / xs.len() as f64;
            (m, xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64)
        };
        let all: Vec<f64> = groups.iter().flat_map(|g| g.iter().copied()).collect();
        let (mean, var) = stats(&all);
        // weights: a group's share of the predictions (the views are the same in every group)
        let parts: Vec<super::GroupMoments> = groups
            .iter()
            .map(|g| {
                let (m, v) = stats(g);
                (g.len(), vec![m as f32, 0.0], vec![v as f32, 0.0])
            })
            .collect();
        let got = pooled_variance(&parts, &[mean as f32, 0.0]);
        assert!((got[0] as f64 - var).abs() < 1e-6, "{} vs {var}", got[0]);
        assert_eq!(got[1], 0.0);
    }
}
