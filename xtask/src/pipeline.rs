//! `cargo xtask pipeline` and the single stages `synth`, `prep`, `train`, `eval`, `submit`.
//!
//! Each stage is one or two runs of the `gz` binary; this module only decides the paths, passes
//! each stage's artifacts to the next and skips a stage whose stamp says it is up to date
//! ([`crate::stamp`]). Layout under `--root` (default: the repository, where these folders are
//! git-ignored): `data/synth/` (the default synthetic set; absent with `--data DIR`),
//! `data/cache/` (shard caches, `gz prep` picks the sub-folder and reuses it), `runs/<name>/`
//! (checkpoints), `reports/<name>/` (report, test predictions, `submission.csv`),
//! `data/stamps/` (stage stamps). Only the Kaggle files of a dataset are read as inputs
//! (`training_solutions_rev1.csv`, `images_training_rev1/`, `images_test_rev1/`), so a real
//! Kaggle download works the same as our synthetic set.

use crate::args::Args;
use crate::cargo::{workspace_root, Build};
use crate::fingerprint;
use crate::gz::{self, Failure};
use crate::stamp::{stamp_path, Output, Stamp};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// `gz prep`'s default centre crop (`--crop`), which `--size` may not exceed.
const PREP_CROP: u32 = 212;

/// The files of a Kaggle-layout dataset that stages read.
const KAGGLE_MEMBERS: &[&str] = &[
    "training_solutions_rev1.csv",
    "images_training_rev1",
    "images_test_rev1",
];

/// Defaults sized so the whole pipeline finishes in under a minute on a 2-core CPU: `tiny` on
/// 32×32 inputs, batch 16, on 1,800 training images, with the CPU recipe below. On CUDA the
/// stages' own defaults apply (106×106, batch 32) for `DEFAULT_EPOCHS`.
pub const DEFAULT_TRAIN: usize = 2000;
pub const DEFAULT_TEST: usize = 500;
pub const DEFAULT_SEED: u64 = 42;
pub const DEFAULT_MODEL: &str = "tiny";
pub const DEFAULT_EPOCHS: u32 = 12;
pub const CPU_SIZE: u32 = 32;
pub const CPU_BATCH: u32 = 16;
/// The CPU recipe for `tiny` (eleventh session's study, docs/benchmarks.md "The default CPU
/// recipe"): 40 epochs, learning rate 2e-3 dropped ×0.1 at 70 % and 90 % of the run (the
/// `dieleman` schedule), no early stop (validation is bumpy before the drops: patience 5
/// stopped every long run before its first drop), no augmentation, and 8-view test-time
/// augmentation: test RMSE 0.096–0.097 over two seeds, against 0.117–0.120 for the earlier 12
/// epochs at 1e-3 without TTA (and 0.102–0.104 for the same recipe trained with augmentation).
pub const CPU_TINY_EPOCHS: u32 = 40;
/// Test-time augmentation of the CPU recipe's eval and submission: the 8 right-angle views.
pub const CPU_TINY_TTA: u32 = 8;
pub const CPU_TINY_TRAIN_ARGS: [(&str, &str); 3] = [("--lr", "2e-3"), ("--schedule", "dieleman"), ("--patience", "0")];
/// From this many training images (validation hold-out included) the CPU recipe trains
/// [`CPU_LARGE_MODEL`] instead of `tiny` (sixteenth session, docs/benchmarks.md "The CPU recipe
/// on larger sets"): with the same recipe `small` (twice as wide, about 2.2× the time per
/// image) scored test RMSE 3 % better than `tiny` at 5,000 images, 4 % at 10,000, 5 % at
/// 20,000 and 7 % at 61,578; on the default 2,000 it won on one seed of two, and lost on
/// average.
pub const CPU_SMALL_FROM: usize = 5_000;
pub const CPU_LARGE_MODEL: &str = "small";
/// The CPU recipe also trains `dieleman-tiny` when asked for (`--model dieleman-tiny`), on
/// 64×64 inputs at learning rate 1e-3, otherwise as `tiny` (seventeenth session,
/// docs/benchmarks.md "Dieleman's net on the CPU" and "Dieleman's image layer as direct
/// loops"): on the default set it scores test RMSE 0.088–0.094 with 8 views over three seeds
/// (mean 0.0905) against `tiny`'s 0.095–0.097, at about 30× the time per image.
pub const CPU_DIELEMAN_MODEL: &str = "dieleman-tiny";
pub const CPU_DIELEMAN_SIZE: u32 = 64;
pub const CPU_DIELEMAN_LR: &str = "1e-3";

const STAGES: [&str; 5] = ["synth", "prep", "train", "eval", "submit"];

/// Everything the stages need, resolved from the command line.
#[derive(Debug)]
struct Ctx {
    root: PathBuf,
    /// `--root` as typed, made absolute but not resolved (an earlier xtask's stamps spell
    /// their paths so: [`migrate_train_stamp`]).
    root_typed: PathBuf,
    /// `Some` for `--data DIR`: a dataset we did not generate; synth is skipped.
    real_data: Option<PathBuf>,
    synth_train: usize,
    synth_test: usize,
    seed: u64,
    seed_given: bool,
    model: String,
    epochs: u32,
    /// Train `tiny` on the CPU with [`CPU_TINY_TRAIN_ARGS`] (those `--train-arg` does not set).
    cpu_recipe: bool,
    device: String,
    batch: Option<u32>,
    /// `gz prep --size`.
    size: Option<u32>,
    /// Train with augmentation (`--augment`, `--no-augment`; default: off in the CPU recipe).
    augment: bool,
    precision: Option<String>,
    tta: Option<u32>,
    prep_args: Vec<String>,
    train_args: Vec<String>,
    name: String,
    force: bool,
    cache_override: Option<PathBuf>,
    gz: GzSource,
    /// The options as typed (but `--force`), for the commands xtask's messages suggest.
    given: Vec<String>,
}

#[derive(Debug)]
enum GzSource {
    Given(PathBuf),
    /// To build on first use; with `cuda`, the CUDA toolkit is set up then too (never while the
    /// command line is still being read: a typo must not cost a 1.3 GB install first).
    Build {
        release: bool,
        cuda: bool,
        cudnn: bool,
    },
    Built(PathBuf),
}

fn absolute(p: PathBuf, base: &Path) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

/// `p` with its longest existing ancestor resolved (symbolic links, `.` and `..`) and the rest
/// appended, for a folder that may not exist yet; `p` itself when no ancestor resolves.
fn resolved(p: &Path) -> PathBuf {
    let mut base = p;
    let mut tail = Vec::new();
    loop {
        if let Ok(r) = base.canonicalize() {
            return tail.iter().rev().fold(r, |acc, name| acc.join(name));
        }
        match (base.parent(), base.file_name()) {
            (Some(parent), Some(name)) => {
                tail.push(name.to_os_string());
                base = parent;
            }
            _ => return p.to_path_buf(),
        }
    }
}

impl Ctx {
    fn parse(mut a: Args) -> Result<Ctx> {
        let given: Vec<String> = a.words().iter().filter(|w| *w != "--force").cloned().collect();
        // the words passed through to gz go first: `--train-arg --seed=5` is gz's --seed, not ours
        let prep_args = a.passthrough("--prep-arg")?;
        let train_args = a.passthrough("--train-arg")?;
        let cwd = std::env::current_dir().context("reading the current directory")?;
        // not created here: a refused command line leaves no folder behind (the stage that
        // first runs gz creates it)
        // (resolved too: the stamps and the paths they record are the root's, so `../r`, a
        // link to `r` and `r` ran every stage again, training a new run, for one folder)
        let root_typed = absolute(a.path("--root")?.unwrap_or_else(workspace_root), &cwd);
        let root = resolved(&root_typed);
        // (resolved: `km/`, `./km` and `km/images_training_rev1/..` are one dataset, its stages
        // up to date whichever was typed, and named `km`, not `data` after `..`)
        let real_data = a.path("--data")?.map(|p| {
            let p = absolute(p, &cwd);
            p.canonicalize().unwrap_or(p)
        });
        let cuda = a.flag("--cuda");
        let cudnn = a.flag("--cudnn");
        let debug = a.flag("--debug");
        let gz_path = a.path("--gz")?;
        // (as gz reads it: any case, spaces around it ignored)
        let device: String = a
            .value("--device")?
            .map(|d| d.trim().to_ascii_lowercase())
            .unwrap_or_else(|| if cuda { "cuda".into() } else { "cpu".into() });
        // said before anything runs: the gz xtask builds without --cuda has no CUDA, and the
        // stages before training (a Kaggle-size prep takes minutes) ran first, then `gz train`
        // advised `cargo xtask build --cuda`, which makes a bundle and leaves the pipeline's gz
        // as it was; `--cudnn` alone was dropped without a word
        // a device gz would refuse is said as such, before any advice to build for it (`cuda:x`
        // was told to add --cuda, which builds the CUDA gz, which then refused `cuda:x`)
        if !device_known(&device) {
            bail!("--device {device}: expected cpu, cuda, cuda:N or auto");
        }
        if gz_path.is_none() {
            if cudnn && !cuda {
                bail!("--cudnn is a feature of the CUDA build of gz: pass --cuda --cudnn");
            }
            if !cuda && device_wants_cuda(&device) {
                bail!(
                    "--device {device} needs gz built with CUDA: add --cuda (xtask then builds it into target/cuda; \
                     --cuda --cudnn for the cuDNN convolutions), or pass a CUDA build of gz with --gz PATH"
                );
            }
        }
        let gz = match gz_path {
            Some(p) => GzSource::Given(absolute(p, &cwd)),
            None => GzSource::Build {
                release: !debug,
                cuda,
                cudnn,
            },
        };
        let seed_arg = a.parsed::<u64>("--seed")?;
        let on_cpu = device == "cpu";
        let (synth_train, synth_test) = (a.parsed("--train")?, a.parsed("--test")?);
        let size_arg = a.parsed::<u32>("--size")?;
        let cache_override = a.path("--cache")?.map(|p| absolute(p, &cwd));
        let model = match a.value("--model")? {
            Some(m) => m,
            // on the CPU the net is sized to the training set (counted only when needed): the
            // cache's when one is given, else the dataset's
            None if on_cpu => {
                let all = cache_override
                    .as_deref()
                    .and_then(cache_train_rows)
                    .unwrap_or_else(|| match &real_data {
                        Some(d) => training_images(d),
                        None => synth_train.unwrap_or(DEFAULT_TRAIN),
                    });
                // `--train-arg --max-train N` trains on N of them
                let n = max_train(&train_args).map_or(all, |m| m.min(all));
                if n >= CPU_SMALL_FROM {
                    CPU_LARGE_MODEL
                } else {
                    DEFAULT_MODEL
                }
                .to_string()
            }
            None => DEFAULT_MODEL.to_string(),
        };
        let cpu_recipe = on_cpu && [DEFAULT_MODEL, CPU_LARGE_MODEL, CPU_DIELEMAN_MODEL].contains(&model.as_str());
        let cpu_size = if cpu_recipe && model == CPU_DIELEMAN_MODEL {
            CPU_DIELEMAN_SIZE
        } else {
            CPU_SIZE
        };
        let name = match a.value("--name")? {
            Some(n) => n,
            None => {
                let ds = match &real_data {
                    None => "synth".to_string(),
                    Some(d) => d
                        .file_name()
                        .map(|n| {
                            n.to_string_lossy()
                                .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
                        })
                        .unwrap_or_else(|| "data".into()),
                };
                format!("{ds}-{model}")
            }
        };
        // runs/<name> and reports/<name> are deleted and rewritten: a name must stay one plain
        // folder inside them
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'));
        if !plain {
            bail!(
                "run name {name:?} (from --name, or the dataset and --model) must be one plain folder name: letters, \
                 digits, '-', '_', '+' and '.', not starting with '.'"
            );
        }
        if let (Some(d), true) = (&real_data, synth_train.is_some() || synth_test.is_some()) {
            bail!(
                "--train/--test size the synthetic set, and --data {} is a dataset of its own: drop them (its \
                 images are all used; `--train-arg --val-fraction F` sets the validation hold-out)",
                d.display()
            );
        }
        // `--cache DIR` is a finished cache, used instead of the prep stage's: the options that
        // say how prep builds one would be ignored
        if let Some(c) = &cache_override {
            let ignored: Vec<&str> = [("--size", size_arg.is_some()), ("--prep-arg", !prep_args.is_empty())]
                .iter()
                .filter_map(|&(o, given)| given.then_some(o))
                .collect();
            if !ignored.is_empty() {
                bail!(
                    "{} {} how the prep stage builds a cache, and --cache {} is one already built (prep does not \
                     run for it): drop {}",
                    ignored.join(" and "),
                    if ignored.len() == 1 { "sets" } else { "set" },
                    c.display(),
                    if ignored.len() == 1 { "it" } else { "them" }
                );
            }
        }
        let ctx = Ctx {
            root,
            root_typed,
            real_data,
            synth_train: synth_train.unwrap_or(DEFAULT_TRAIN),
            synth_test: synth_test.unwrap_or(DEFAULT_TEST),
            seed: seed_arg.unwrap_or(DEFAULT_SEED),
            seed_given: seed_arg.is_some(),
            model,
            epochs: a
                .parsed("--epochs")?
                .unwrap_or(if cpu_recipe { CPU_TINY_EPOCHS } else { DEFAULT_EPOCHS }),
            cpu_recipe,
            device,
            batch: a.parsed("--batch")?.or(if on_cpu { Some(CPU_BATCH) } else { None }),
            size: size_arg.or(if on_cpu { Some(cpu_size) } else { None }),
            // off in the CPU recipe (with 8-view TTA it scores better unaugmented), else on
            augment: match (a.flag("--augment"), a.flag("--no-augment")) {
                (true, true) => bail!("--augment and --no-augment contradict each other"),
                (true, false) => true,
                (false, true) => false,
                (false, false) => !cpu_recipe,
            },
            precision: a.value("--precision")?,
            tta: a
                .parsed("--tta")?
                .or(if cpu_recipe { Some(CPU_TINY_TTA) } else { None }),
            prep_args,
            train_args,
            name,
            force: a.flag("--force"),
            cache_override,
            gz,
            given,
        };
        a.finish()?;
        ctx.check_values()?;
        Ok(ctx)
    }

    /// The `--crop` passed to `gz prep` with `--prep-arg`, if one is and reads as a number.
    fn prep_crop(&self) -> Option<u32> {
        let a = &self.prep_args;
        a.iter().enumerate().find_map(|(i, w)| match w.strip_prefix("--crop") {
            Some("") => a.get(i + 1)?.parse().ok(),
            Some(v) => v.strip_prefix('=')?.parse().ok(),
            None => None,
        })
    }

    /// Refuses, before anything is created or run, the option values `gz` would refuse only
    /// when its stage comes (`--tta 3` after the whole training), and a root among the
    /// dataset's images.
    fn check_values(&self) -> Result<()> {
        const MODELS: [&str; 5] = ["vgg16-blog", "dieleman", "tiny", "small", "dieleman-tiny"];
        if !MODELS.contains(&self.model.as_str()) {
            bail!("--model {}: expected one of {}", self.model, MODELS.join(", "));
        }
        // (gz's own reading: `gz_model::device::parse_device`, `Precision::from_name`)
        if !device_known(&self.device) {
            bail!("--device {}: expected cpu, cuda, cuda:N or auto", self.device);
        }
        match self.precision.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("f32" | "fp32") => {}
            Some("bf16") if self.device != "cpu" => {}
            Some("bf16") => bail!("--precision bf16 needs a CUDA device (--device cuda): the CPU trains in f32"),
            Some(p) => bail!("--precision {p}: expected f32 or bf16"),
        }
        if self.real_data.is_none() && self.synth_train == 0 {
            bail!("--train must be at least 1 (the synthetic set's training images)");
        }
        for (flag, v) in [
            ("--epochs", Some(self.epochs)),
            ("--batch", self.batch),
            ("--size", self.size),
        ] {
            if v == Some(0) {
                bail!("{flag} must be at least 1");
            }
        }
        // the options each stage sets itself: gz would refuse one given twice, after synth
        for (flag, given, own) in [
            ("--prep-arg", &self.prep_args, &["--data", "--cache", "--size"][..]),
            ("--train-arg", &self.train_args, &["--cache", "--out"][..]),
        ] {
            if let Some(w) = given
                .iter()
                .find(|w| own.iter().any(|o| *w == o || w.starts_with(&format!("{o}="))))
            {
                let o = w.split('=').next().unwrap_or(w);
                bail!(
                    "{flag} {o}: the stage sets {o} itself{}",
                    if o == "--size" { " (pass --size N to xtask)" } else { "" }
                );
            }
        }
        if let Some(c) = self.prep_crop().filter(|c| *c == 0 || *c > 424) {
            bail!("--prep-arg --crop {c}: the centre crop is 1 to 424 pixels of the 424×424 image");
        }
        // (gz prep's own rule, `PrepConfig::validate`: found only after synth, before)
        if let Some(size) = self.size {
            let crop = self.prep_crop().unwrap_or(PREP_CROP);
            if size > crop {
                bail!(
                    "--size {size} is larger than the centre crop it is taken from ({crop} pixels of the 424; \
                     `--prep-arg --crop N` sets it): at most {crop}"
                );
            }
        }
        if let Some(t) = self.tta.filter(|t| ![1, 2, 4, 8, 60].contains(t)) {
            bail!("--tta {t}: expected a preset, 1, 2, 4, 8 or 60 (gz predict --help)");
        }
        if self.name.len() > 200 {
            bail!(
                "the run name (--name, or the dataset and --model) is {} bytes, at most 200: it names folders",
                self.name.len()
            );
        }
        if let Some(c) = self.cache_override.as_deref() {
            if !c.is_dir() {
                bail!(
                    "--cache {}: no such folder (a cache gz prep built, the folder it prints as `cache:`)",
                    c.display()
                );
            }
            if !c.join("manifest.json").is_file() {
                bail!(
                    "--cache {}: not a shard cache (no manifest.json): pass the folder `gz prep` prints as `cache:`",
                    c.display()
                );
            }
        }
        if let Some(file) = self.root.ancestors().find(|a| a.exists() && !a.is_dir()) {
            bail!(
                "--root {}: {} is not a folder (the root holds data/, runs/ and reports/)",
                self.root.display(),
                file.display()
            );
        }
        // the root's longest existing folder, resolved, against the dataset's image folders
        let mut base = self.root.as_path();
        let resolved = loop {
            if let Ok(r) = base.canonicalize() {
                break Some(r);
            }
            match base.parent() {
                Some(p) => base = p,
                None => break None,
            }
        };
        if let (Some(data), Some(root)) = (&self.real_data, resolved) {
            for images in ["images_training_rev1", "images_test_rev1"] {
                if let Ok(images) = data.join(images).canonicalize() {
                    if root.starts_with(&images) {
                        bail!(
                            "--root {} lies inside the dataset's image folder {}: the pipeline's files would be \
                             taken for the dataset's; choose a root elsewhere",
                            self.root.display(),
                            images.display()
                        );
                    }
                }
            }
        }
        Ok(())
    }

    fn data_dir(&self) -> PathBuf {
        self.real_data
            .clone()
            .unwrap_or_else(|| self.root.join("data").join("synth"))
    }
    fn cache_root(&self) -> PathBuf {
        self.root.join("data").join("cache")
    }
    fn run_dir(&self) -> PathBuf {
        self.root.join("runs").join(&self.name)
    }
    fn report_dir(&self) -> PathBuf {
        self.root.join("reports").join(&self.name)
    }
    fn predictions(&self) -> PathBuf {
        self.report_dir().join("test_predictions.csv")
    }
    fn submission(&self) -> PathBuf {
        self.report_dir().join("submission.csv")
    }

    /// The `gz` binary, built on first use.
    fn gz(&mut self) -> Result<PathBuf> {
        let path = match &self.gz {
            GzSource::Given(p) | GzSource::Built(p) => p.clone(),
            &GzSource::Build { release, cuda, cudnn } => Build {
                release,
                cuda_env: if cuda {
                    Some(crate::cuda_setup::ensure_default()?)
                } else {
                    None
                },
                cudnn,
            }
            .run()?,
        };
        if path.is_dir() {
            bail!("gz binary {} is a folder, not the gz program", path.display());
        }
        if !path.is_file() {
            bail!("gz binary {} does not exist", path.display());
        }
        self.gz = GzSource::Built(path.clone());
        Ok(path)
    }

    fn s(p: &Path) -> String {
        p.to_string_lossy().into_owned()
    }

    fn dataset_identity(&mut self) -> Result<String> {
        let d = self.data_dir();
        if self.real_data.is_none() {
            // our synthetic set: the synth stage of these options must have finished (else prep
            // and the stages after it ran on a missing set, or silently on that of other options)
            match self.stamp("synth", &d) {
                None if !d.join("synth.json").is_file() => {
                    bail!(
                        "no synthetic dataset in {} yet{}: run `{}` first (or the pipeline; for real data, \
                     pass --data DIR)",
                        d.display(),
                        if d.join("synth.in-progress").exists() {
                            " (its generation was interrupted)"
                        } else {
                            ""
                        },
                        self.stage_command("synth")
                    )
                }
                None => {}
                Some(stamp) => {
                    let inputs = synth_inputs(self)?;
                    upstream_current("synth", &stamp, &synth_command(self), &inputs)?
                }
            }
        }
        if !d.is_dir() {
            bail!("the dataset folder {} does not exist", d.display());
        }
        let id = fingerprint::identity_of(&d, KAGGLE_MEMBERS)?;
        let missing: Vec<&str> = ["training_solutions_rev1.csv", "images_training_rev1"]
            .into_iter()
            .filter(|m| id.contains(&format!("{m}: missing")))
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} is not a dataset in Kaggle layout: it has no {} (it needs training_solutions_rev1.csv, \
                 images_training_rev1/ and images_test_rev1/)",
                d.display(),
                missing.join(" and no ")
            );
        }
        Ok(id)
    }

    /// The cache from `--cache` or from prep's stamp, which must be that of these options (a
    /// stage run alone must not train or score on the cache of another `--size`, `--seed`, …).
    fn cache(&mut self) -> Result<PathBuf> {
        if let Some(c) = &self.cache_override {
            check_cache_dataset(self)?;
            return Ok(c.clone());
        }
        let stamp = self.stamp("prep", &self.data_dir());
        let cache = stamp
            .as_ref()
            .and_then(|s| s.output("cache").map(Path::to_path_buf))
            .filter(|p| p.exists())
            .with_context(|| {
                format!(
                    "no shard cache for {} yet: run `{}` first (or pass --cache DIR)",
                    self.data_dir().display(),
                    self.stage_command("prep")
                )
            })?;
        let (cmd, inputs) = (prep_command(self), prep_inputs(self)?);
        if let Some(stamp) = stamp {
            upstream_current("prep", &stamp, &cmd, &inputs)?;
        }
        Ok(cache)
    }

    /// `cargo xtask STAGE` with the options given to this command (a hint to paste: without
    /// them it would run in the repository's root, on the default set's sizes).
    fn stage_command(&self, stage: &str) -> String {
        let mut words = vec!["cargo".to_string(), "xtask".into(), stage.into()];
        words.extend(self.given.iter().cloned());
        gz::shell_words(&words)
    }

    /// The stamp of `stage` for `key` ([`Stamp::find_spelled`] under the root as typed too).
    fn stamp(&self, stage: &str, key: &Path) -> Option<Stamp> {
        Stamp::find_spelled(&self.root, &self.root_typed, stage, key).map(|(s, _)| s)
    }

    fn need_run(&self) -> Result<PathBuf> {
        let r = self.run_dir();
        let (weights, sidecar) = ("best.safetensors", "best.json");
        let has_weights = r.join(weights).exists();
        match (has_weights, r.join(sidecar).exists()) {
            (false, false) => bail!(
                "no trained run in {} yet: run `{}` first (or pass --name RUN)",
                r.display(),
                self.stage_command("train")
            ),
            // a best checkpoint is the weights and their sidecar together: gz cannot load one
            // without the other; said here with the way out, before any gz runs on it
            (true, true) => {}
            _ => {
                let (has, missing) = if has_weights {
                    (weights, sidecar)
                } else {
                    (sidecar, weights)
                };
                bail!(
                    "the run in {} has {has} but not {missing}: its best checkpoint is incomplete (deleted or \
                     moved?); put {missing} back, or train the run again with `cargo xtask train --force` and the \
                     same options (this replaces the folder {})",
                    r.display(),
                    r.display()
                );
            }
        }
        // a run xtask started (its note is there) is finished when its stage was stamped; until
        // then its best checkpoint is that of an interrupted run
        let stamp = self.stamp("train", &r);
        if r.join(TRAIN_NOTE).exists() && stamp.is_none() {
            // a pipeline running stages in this root (training this run, say) is named as
            // such, not taken for an interrupted one
            crate::lock::hold(&self.root)?;
            bail!(
                "the training run in {} has not finished (interrupted?): run `cargo xtask train` (it resumes the run) \
                 or the pipeline first",
                r.display()
            );
        }
        Ok(r)
    }

    /// [`Self::need_run`] for a stage after training (eval, submit): also the train stage's stamp
    /// must be that of the command these options give, on `cache` (`cargo xtask eval --epochs
    /// 5` after a 3-epoch pipeline scored the 3-epoch run as "up to date").
    fn need_current_run(&self, cache: &Path) -> Result<PathBuf> {
        let r = self.need_run()?;
        let (cmd, inputs) = (train_command(self, cache, &r), train_inputs(cache)?);
        // (a stamp an earlier xtask wrote, current by its rules: an eval right after an
        // upgrade said the train stage was not up to date)
        migrate_train_stamp(self, cache, &r, &cmd, &inputs)?;
        if let Some(stamp) = self.stamp("train", &r) {
            upstream_current("train", &stamp, &stamped_command("train", vec![cmd]), &inputs)?;
        }
        Ok(r)
    }
}

/// Fails, naming the stage to run first, when the stamp of the upstream stage `name` is not
/// that of the command and inputs the current options give.
fn upstream_current(name: &str, stamp: &Stamp, cmd: &[String], inputs: &[(String, String)]) -> Result<()> {
    let Some(why) = stamp.stale_reason(cmd, inputs)? else {
        return Ok(());
    };
    let detail = if stamp.command == cmd {
        why
    } else {
        format!(
            "it ran `gz {}`, these options give `gz {}`",
            gz::shell_words(&stamp.command),
            gz::shell_words(cmd)
        )
    };
    bail!(
        "the `{name}` stage is not up to date for these options ({detail}): run `cargo xtask {name}` with the same \
         options first (or the pipeline)"
    )
}

/// What a stage's `before_run` decided.
#[derive(Debug, PartialEq)]
enum BeforeRun {
    /// Run the commands, with these arguments appended to the last one (not stamped).
    Run(Vec<String>),
    /// The outputs are already complete (a finished run whose stamp a kill prevented): stamp them.
    Done,
}

/// What happened to one stage.
#[derive(Debug)]
struct Done {
    stage: &'static str,
    ran: bool,
    stamp: Stamp,
}

/// One stage: `cmds` are gz argument lists run in order; `outputs` turns the last stdout into the
/// stage's artifacts; `before_run` clears stale outputs.
fn stage(
    ctx: &mut Ctx,
    name: &'static str,
    key: &Path,
    cmds: Vec<Vec<String>>,
    inputs: Vec<(String, String)>,
    before_run: impl FnOnce(&[String]) -> Result<BeforeRun>,
    outputs: impl FnOnce(&str) -> Result<Vec<Output>>,
) -> Result<Done> {
    stage_unless(ctx, name, key, cmds, inputs, |_| None, before_run, outputs)
}

/// [`stage`], with one more reason to run a stage whose stamp is up to date: `stale(stamp)`
/// (the prep stage's, when an input it could not read can be read now).
#[allow(clippy::too_many_arguments)]
fn stage_unless(
    ctx: &mut Ctx,
    name: &'static str,
    key: &Path,
    cmds: Vec<Vec<String>>,
    inputs: Vec<(String, String)>,
    stale: impl FnOnce(&Stamp) -> Option<String>,
    before_run: impl FnOnce(&[String]) -> Result<BeforeRun>,
    outputs: impl FnOnce(&str) -> Result<Vec<Output>>,
) -> Result<Done> {
    // a stop asked for while the previous stage's gz ran, which then finished: this stage
    // does not start (nothing of it is touched)
    if let Some(signal) = gz::stop_requested() {
        return Err(gz::Stopped {
            signal,
            message: format!(
                "stopped by {} before stage `{name}`; run the same command again to go on (finished stages are kept)",
                gz::signal_name(signal)
            ),
        }
        .into());
    }
    let sp = stamp_path(&ctx.root, name, key);
    // (an xtask from before 2026-12-01 kept it elsewhere)
    let legacy = crate::stamp::legacy_stamp_path(&ctx.root, name, key);
    let flat = stamped_command(name, cmds.clone());
    let found = Stamp::find_spelled(&ctx.root, &ctx.root_typed, name, key);
    // (where an earlier xtask kept it, when not at `sp`: it goes once moved or stale)
    let elsewhere = found.as_ref().map(|(_, p)| p.clone()).filter(|p| *p != sp);
    let reason = match found.map(|(s, _)| s) {
        _ if ctx.force => "--force".to_string(),
        // (a stamp that exists but does not read: an older xtask's, or damaged)
        None if sp.exists() => format!("its stamp {} could not be read", sp.display()),
        None => "no finished run of it is recorded (never run, or stopped before its end)".to_string(),
        Some(s) => match s.stale_reason(&flat, &inputs)?.or_else(|| stale(&s)) {
            None => {
                // (one an earlier xtask kept elsewhere moves to where a moved root finds it)
                let s = match &elsewhere {
                    None => s,
                    Some(old) => {
                        let outs: Vec<Output> = s.outputs.iter().map(|(o, _)| o.clone()).collect();
                        let moved = Stamp::save(&sp, name, &s.command, &s.inputs, &outs, &s.stdout)?;
                        let _ = std::fs::remove_file(old);
                        moved
                    }
                };
                eprintln!("xtask: {name}: up to date (stamp {})", sp.display());
                return Ok(Done {
                    stage: name,
                    ran: false,
                    stamp: s,
                });
            }
            Some(r) => r,
        },
    };
    // one xtask at a time in a root from here on (the lock creates the root)
    crate::lock::hold(&ctx.root)?;
    eprintln!("xtask: {name}: running because {reason}");
    // `before_run` may ask for arguments appended to the last command this time only (not part
    // of the stamp: `--resume` for an interrupted training run), or find the work done. A
    // refusal there keeps the old stamp: the next call gives the same reason (not "it has not
    // run yet"), and a stamp whose outputs `before_run` removed in part is stale by them
    let (extra, cmds) = match before_run(&flat)? {
        BeforeRun::Run(extra) => (extra, cmds),
        BeforeRun::Done => (vec![], vec![]),
    };
    // the old stamp no longer describes what is on disk once the stage starts over
    for p in [Some(&sp), Some(&legacy), elsewhere.as_ref()].into_iter().flatten() {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing the stale stamp {}", p.display())),
        }
    }
    // gz runs in the root (relative paths it prints are resolved there)
    let gz_bin = ctx.gz()?;
    let mut all_stdout = String::new();
    let mut last = String::new();
    let started = std::time::Instant::now();
    for (i, c) in cmds.iter().enumerate() {
        let mut c = c.clone();
        if i + 1 == cmds.len() {
            c.extend(extra.iter().cloned());
        }
        let c = &c;
        // `gz prep`'s status 2: some inputs were skipped (listed above, and in the cache's
        // manifest) and the cache holds the rest; the pipeline goes on with them (the submit
        // stage fills skipped test images' rows with the training mean, listing them)
        let partial = (name == "prep").then_some(gz::Partial { code: 2, key: "cache" });
        match gz::run_allowing(&gz_bin, c, &ctx.root, partial)? {
            Ok(f) => {
                if f.partial {
                    eprintln!(
                        "xtask: {name}: some inputs were skipped (the `skipped:` lines above); going on with the rest"
                    );
                }
                all_stdout.push_str(&f.stdout);
                last = f.stdout;
            }
            Err(Failure::NotBuilt(msg)) => {
                bail!("{msg} (nothing was produced for `{name}`; the stages after it were not run)")
            }
            Err(Failure::Interrupted(signal)) => {
                let next = if name == "train" {
                    "run the same command again to continue: training resumes after its last finished epoch (starts over \
                     when none had finished)"
                } else {
                    "run the same command again: this stage starts over, the finished ones are kept"
                };
                return Err(gz::Stopped {
                    signal,
                    message: format!("stage `{name}` stopped by {}; {next}", gz::signal_name(signal)),
                }
                .into());
            }
            Err(Failure::Failed { status, stderr_tail }) => {
                // gz's messages went by above as it ran: its error again, last, where the eye
                // lands (not all its last lines a second time)
                let lines: Vec<&str> = stderr_tail.lines().collect();
                let from = lines.iter().rposition(|l| l.starts_with("error:")).unwrap_or(0);
                let said = lines[from..].join("\n");
                bail!(
                    "stage `{name}` failed: `gz {}` ended with {status}{}",
                    c.first().map_or("", String::as_str),
                    if said.is_empty() {
                        String::new()
                    } else {
                        format!(":\n{said}")
                    }
                )
            }
        }
    }
    let outs = outputs(&last)?;
    for o in &outs {
        if !o.path.exists() {
            bail!(
                "stage `{name}` finished but its output {} ({}) does not exist",
                o.label,
                o.path.display()
            );
        }
    }
    // (named now: a root made by this stage is named by what it is, `stamp_path`)
    let sp = stamp_path(&ctx.root, name, key);
    let stamp = Stamp::save(&sp, name, &flat, &inputs, &outs, &all_stdout)?;
    eprintln!("xtask: {name}: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(Done {
        stage: name,
        ran: true,
        stamp,
    })
}

fn run_synth(ctx: &mut Ctx) -> Result<Done> {
    if let Some(d) = &ctx.real_data {
        bail!("--data {} given: there is nothing to synthesize", d.display());
    }
    let out = ctx.data_dir();
    let cmd = synth_command(ctx);
    let out2 = out.clone();
    let inputs = synth_inputs(ctx)?;
    stage(
        ctx,
        "synth",
        &out,
        vec![cmd],
        inputs,
        move |_| synth_before_run(&out2),
        |_| Ok(vec![Output::new("dataset", &out, KAGGLE_MEMBERS)]),
    )
}

/// The synth stage's inputs: the generator version its gz draws.
fn synth_inputs(ctx: &mut Ctx) -> Result<Vec<(String, String)>> {
    let gz_bin = ctx.gz()?;
    Ok(vec![("generator".to_string(), generator_version(&gz_bin)?)])
}

/// The synthetic-set generator version `gz` draws (`gz synth --generator-version`; a gz from
/// before the option draws version 1): the synth stage's input, so that a set an earlier gz drew
/// is replaced rather than kept as up to date when gz now draws other images. Only a usage error
/// (exit status 2: the option is unknown) means an older gz; any other failure (a crash, a kill)
/// is reported, since taking it for version 1 would regenerate the set and rerun every stage
/// after it. (A program that succeeds printing nothing, the tests' stand-in `/bin/true`, counts
/// as version 1.)
fn generator_version(gz: &Path) -> Result<String> {
    let shown = format!("{} synth --generator-version", gz.display());
    let out = gz::output_retrying(
        std::process::Command::new(gz)
            .args(["synth", "--generator-version"])
            .stdin(std::process::Stdio::null()),
    )
    .with_context(|| format!("running {shown}"))?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // a gz built without the stage says so, as it would running the stage (gz::run)
    if let Some(line) = stderr
        .lines()
        .find(|l| !out.status.success() && l.contains("not built yet"))
    {
        bail!("{}", line.trim().trim_start_matches("error:").trim());
    }
    match out.status.code() {
        Some(0) if v.is_empty() => Ok("1".into()),
        Some(0) => Ok(v),
        Some(2) => Ok("1".into()),
        _ => bail!("{shown} failed ({}): {}", out.status, stderr.trim()),
    }
}

/// Before `gz synth` runs: data/synth is ours (synth never runs with --data), so a stale or
/// interrupted set there is replaced, by `gz synth --force` (which removes only gz synth's files,
/// under its lock: a `gz synth` still writing there is not disturbed, the new one is refused);
/// a folder holding something else is refused.
fn synth_before_run(out: &Path) -> Result<BeforeRun> {
    // gz synth's marks: `synth.json` (complete) or `synth.in-progress` (interrupted); Kaggle-layout
    // data without either is someone's download, not ours to delete
    if out.join("synth.json").exists() || out.join("synth.in-progress").exists() {
        eprintln!("xtask: synth: replacing {}", out.display());
        return Ok(BeforeRun::Run(vec!["--force".into()]));
    }
    // (gz synth's lock file, left by a killed run, is not content)
    let content =
        std::fs::read_dir(out).is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name() != ".gz-synth.lock")));
    if content {
        bail!(
            "{} exists and was not written by `gz synth` (no synth.json or synth.in-progress); move it away or pass \
             --root (for real data, pass --data DIR)",
            out.display()
        );
    }
    Ok(BeforeRun::Run(vec![]))
}

/// The `gz synth` command of the synth stage.
fn synth_command(ctx: &Ctx) -> Vec<String> {
    vec![
        "synth".into(),
        "--out".into(),
        Ctx::s(&ctx.data_dir()),
        "--train".into(),
        ctx.synth_train.to_string(),
        "--test".into(),
        ctx.synth_test.to_string(),
        "--seed".into(),
        ctx.seed.to_string(),
    ]
}

/// The `gz prep` command of the prep stage.
fn prep_command(ctx: &Ctx) -> Vec<String> {
    let mut cmd = vec![
        "prep".into(),
        "--data".into(),
        Ctx::s(&ctx.data_dir()),
        "--cache".into(),
        Ctx::s(&ctx.cache_root()),
    ];
    if let Some(size) = ctx.size {
        cmd.extend(["--size".into(), size.to_string()]);
    }
    cmd.extend(ctx.prep_args.iter().cloned());
    cmd
}

/// The prep stage's inputs: the dataset and the gz binary (a new gz may read more of the dataset
/// (an older one skipped `.JPG` files) or prepare it differently (a new config version, a new
/// cache name); rerunning prep costs a cache hit when nothing changed, and the stages after it
/// rerun only when its cache did).
fn prep_inputs(ctx: &mut Ctx) -> Result<Vec<(String, String)>> {
    let gz_bin = ctx.gz()?;
    Ok(vec![
        ("dataset".to_string(), ctx.dataset_identity()?),
        ("gz binary".to_string(), fingerprint::identity(&gz_bin)?),
    ])
}

fn run_prep(ctx: &mut Ctx) -> Result<Done> {
    if let Some(c) = &ctx.cache_override {
        // (the pipeline skips prep with --cache; this is `cargo xtask prep --cache DIR`)
        bail!(
            "--cache {} names a finished shard cache for train, eval and submit to use instead of the prep stage's; \
             `cargo xtask prep` builds that stage's cache under {} (--root DIR moves it): drop --cache, or build a \
             cache elsewhere with `gz prep --data DATA --cache DIR` (it prints the cache folder to pass as --cache)",
            c.display(),
            ctx.cache_root().display()
        );
    }
    let data = ctx.data_dir();
    let cmd = prep_command(ctx);
    let inputs = prep_inputs(ctx)?;
    let root = ctx.root.clone();
    // the same command on the same inputs, its cache changed since (a damaged shard): `gz prep`
    // would take the cache for good on a hit, so it checks every checksum this time and rebuilds
    // a damaged one (without, every later stage failed on it, run after run)
    let damaged = !ctx.force
        && ctx.stamp("prep", &data).is_some_and(|s| {
            s.stale_reason(&cmd, &inputs)
                .ok()
                .flatten()
                .is_some_and(|r| r.starts_with("its output") && r.ends_with("changed"))
        })
        && !ctx.prep_args.iter().any(|a| a == "--verify");
    // an input gz prep could not read (its permissions, an I/O error), which it left out, can
    // be read now: its size and modification time, all the dataset's identity sees, did not
    // change, and the cache kept going without it for good (`gz prep` rebuilds such a cache)
    let readable_again = {
        let root = ctx.root.clone();
        move |s: &Stamp| {
            let p = unreadable_skips(&s.stdout, &root).into_iter().find(|p| readable(p))?;
            Some(format!(
                "{} could not be read when it ran, and can be read now",
                p.display()
            ))
        }
    };
    stage_unless(
        ctx,
        "prep",
        &data,
        vec![cmd],
        inputs,
        readable_again,
        move |_| Ok(BeforeRun::Run(if damaged { vec!["--verify".into()] } else { vec![] })),
        move |stdout| {
            let c = gz::result_line(stdout, "cache").context("`gz prep` did not print a `cache: <path>` line")?;
            Ok(vec![Output::new("cache", &absolute(PathBuf::from(c), &root), &[])])
        },
    )
}

/// The inputs `gz prep` left out as unreadable, from its `skipped: PATH: cannot read: …` lines
/// (a relative PATH is in the root, where gz runs).
fn unreadable_skips(stdout: &str, root: &Path) -> Vec<PathBuf> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("skipped: ")?.split_once(": cannot read:"))
        .map(|(p, _)| absolute(PathBuf::from(p), root))
        .collect()
}

/// Whether `p` can be read, all of it, as gz prep reads it (a file whose reading failed partway
/// would otherwise rerun prep, a rebuild of the cache, at every call).
fn readable(p: &Path) -> bool {
    std::fs::read(p).is_ok()
}

/// The `--max-train N` among the words passed to `gz train` (`--max-train=N` or `--max-train`,
/// `N`; the last one given), if it is a number (gz train refuses any other).
fn max_train(train_args: &[String]) -> Option<usize> {
    let mut found = None;
    for (i, a) in train_args.iter().enumerate() {
        if let Some(v) = a.strip_prefix("--max-train=") {
            found = v.parse().ok();
        } else if a == "--max-train" {
            found = train_args.get(i + 1).and_then(|v| v.parse().ok());
        }
    }
    found
}

/// The `gz train` command of the train stage.
fn train_command(ctx: &Ctx, cache: &Path, run: &Path) -> Vec<String> {
    // an option the user passes with `--train-arg` wins over the one xtask would pass (gz train
    // takes each option once); the cache and the run folder are the stage's own
    let given = |flag: &str| {
        ctx.train_args
            .iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
    };
    let mut cmd: Vec<String> = vec!["train".into(), "--cache".into(), Ctx::s(cache)];
    let mut push = |flag: &str, value: Option<String>| {
        if !given(flag) || flag == "--out" {
            cmd.push(flag.to_string());
            cmd.extend(value);
        }
    };
    push("--model", Some(ctx.model.clone()));
    push("--epochs", Some(ctx.epochs.to_string()));
    push("--device", Some(ctx.device.clone()));
    push("--out", Some(Ctx::s(run)));
    if let Some(b) = ctx.batch {
        push("--batch", Some(b.to_string()));
    }
    if !ctx.augment && !given("--augment") {
        push("--no-augment", None);
    }
    if ctx.cpu_recipe {
        for (flag, value) in CPU_TINY_TRAIN_ARGS {
            let value = if flag == "--lr" && ctx.model == CPU_DIELEMAN_MODEL {
                CPU_DIELEMAN_LR
            } else {
                value
            };
            push(flag, Some(value.to_string()));
        }
    }
    if let Some(p) = &ctx.precision {
        push("--precision", Some(p.clone()));
    }
    if ctx.seed_given {
        push("--seed", Some(ctx.seed.to_string()));
    }
    cmd.extend(ctx.train_args.iter().cloned());
    cmd
}

fn run_train(ctx: &mut Ctx) -> Result<Done> {
    let cache = ctx.cache()?;
    let run = ctx.run_dir();
    let cmd = train_command(ctx, &cache, &run);
    let inputs = train_inputs(&cache)?;
    migrate_train_stamp(ctx, &cache, &run, &cmd, &inputs)?;
    let run2 = run.clone();
    let inputs2 = inputs.clone();
    let force = ctx.force;
    // (the note names paths in the root as stamps do: a moved root keeps its run)
    let root = ctx.root.clone();
    let done = stage(
        ctx,
        "train",
        &run,
        vec![cmd],
        inputs,
        move |flat| train_before_run(&run2, &crate::stamp::marked(flat, &root), &inputs2, force),
        |_| Ok(vec![Output::new("run", &run, &["best.safetensors", "best.json"])]),
    );
    settle_replaced_run(&run, done.is_ok())?;
    done
}

/// What stands for the shard cache in the train stage's stamped command: the stage's input is
/// the cache's training split ([`train_inputs`]), not the folder, whose name changes with
/// every image of the dataset, test images too.
const CACHE_IN_STAMP: &str = "<cache of the prep stage>";

/// A stage's commands as its stamp records and compares them, joined by `&&`: as run, but in
/// the train stage's the `--cache` folder is [`CACHE_IN_STAMP`] (adding, removing or touching
/// a test image gives the cache another folder, and retrained the run from scratch: hours at
/// Kaggle's scale, for images training never reads).
fn stamped_command(stage: &str, cmds: Vec<Vec<String>>) -> Vec<String> {
    let mut flat: Vec<String> = cmds.join(&["&&".to_string()][..]);
    if stage == "train" {
        if let Some(i) = flat.iter().position(|w| w == "--cache") {
            if let Some(v) = flat.get_mut(i + 1) {
                *v = CACHE_IN_STAMP.to_string();
            }
        }
    }
    flat
}

/// The train stage's input: the cache's training split as its manifest describes it (the
/// preprocessing config and, per shard, index and labels file, rows and CRC-32), the same for
/// every cache of the same training images prepared the same way, whatever the test images and
/// the folder's name. A manifest that does not read counts by the folder's identity (`gz train`
/// then says what is wrong with it).
fn train_inputs(cache: &Path) -> Result<Vec<(String, String)>> {
    let manifest = cache.join("manifest.json");
    let described = std::fs::read(&manifest)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|m| {
            let train = m
                .get("splits")?
                .as_array()?
                .iter()
                .find(|s| s.get(0).and_then(|n| n.as_str()) == Some("train"))?
                .get(1)?
                .clone();
            Some(serde_json::json!({
                "format": m.get("format")?,
                "version": m.get("version")?,
                "config_hash": m.get("config_hash")?,
                "prep_config": m.get("prep_config")?,
                "train": train,
            }))
        });
    let id = match described {
        Some(d) => format!("fnv={}", fingerprint::hash_str(&d.to_string())),
        None => format!("cache {}", fingerprint::identity(cache)?),
    };
    Ok(vec![("training split".to_string(), id)])
}

/// A train stamp and run note of an xtask from before [`stamped_command`] and [`train_inputs`]
/// (the cache's folder in the command, the folder's identity as the input) that are current
/// by their own rules are rewritten in today's form, so that an upgraded xtask keeps a finished
/// run (and resumes an interrupted one) rather than training again.
fn migrate_train_stamp(ctx: &Ctx, cache: &Path, run: &Path, cmd: &[String], inputs: &[(String, String)]) -> Result<()> {
    migrate_train_stamp_as(ctx, cache, run, cmd, inputs, run, cmd)?;
    // an earlier xtask did not resolve --root either: its stamp is found by, and its command
    // names, the paths under the root as typed (through a link, say)
    if ctx.root_typed != ctx.root {
        let respell = |p: &Path| match p.strip_prefix(&ctx.root) {
            Ok(rest) => ctx.root_typed.join(rest),
            Err(_) => p.to_path_buf(),
        };
        let old_cmd: Vec<String> = cmd
            .iter()
            .map(|w| {
                let p = Path::new(w);
                if p.is_absolute() && p.starts_with(&ctx.root) {
                    respell(p).display().to_string()
                } else {
                    w.clone()
                }
            })
            .collect();
        migrate_train_stamp_as(ctx, cache, run, cmd, inputs, &respell(run), &old_cmd)?;
    }
    Ok(())
}

/// [`migrate_train_stamp`] of a stamp an earlier xtask wrote for the run spelled `old_run`
/// with the command `old_cmd`.
fn migrate_train_stamp_as(
    ctx: &Ctx,
    cache: &Path,
    run: &Path,
    cmd: &[String],
    inputs: &[(String, String)],
    old_run: &Path,
    old_cmd: &[String],
) -> Result<()> {
    let old_inputs = vec![("cache".to_string(), fingerprint::identity(cache)?)];
    let flat = stamped_command("train", vec![cmd.to_vec()]);
    let sp = stamp_path(&ctx.root, "train", run);
    // (where it lies: it goes once carried over, or found stale, else every call did this again)
    let stamp = [
        stamp_path(&ctx.root, "train", old_run),
        crate::stamp::legacy_stamp_path(&ctx.root, "train", old_run),
    ]
    .into_iter()
    .filter_map(|p| Some((Stamp::load(&p)?, p)))
    .find(|(s, _)| s.command.as_slice() == old_cmd);
    let note_path = run.join(TRAIN_NOTE);
    let old_note = serde_json::json!({ "command": old_cmd, "inputs": old_inputs });
    let note_is_old = std::fs::read(&note_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v == old_note);
    if stamp.is_none() && !note_is_old {
        return Ok(());
    }
    crate::lock::hold(&ctx.root)?;
    if note_is_old {
        let note = serde_json::json!({ "command": crate::stamp::marked(&flat, &ctx.root), "inputs": inputs });
        crate::stamp::write_atomic(&note_path, format!("{note:#}\n").as_bytes())?;
    }
    if let Some((s, from)) = stamp {
        let current = s.stale_reason(old_cmd, &old_inputs)?.is_none();
        if current {
            // (the run as spelled now)
            let outs: Vec<Output> = s
                .outputs
                .iter()
                .map(|(o, _)| Output {
                    path: if o.path == old_run {
                        run.to_path_buf()
                    } else {
                        o.path.clone()
                    },
                    ..o.clone()
                })
                .collect();
            Stamp::save(&sp, "train", &flat, inputs, &outs, &s.stdout)?;
        }
        if from != sp {
            std::fs::remove_file(&from)
                .with_context(|| format!("removing the carried-over stamp {}", from.display()))?;
        }
    }
    Ok(())
}

/// After the train stage: the stale run [`train_before_run`] put aside goes once the new run
/// has trained an epoch (its `last.json`), and comes back when the new one failed or stopped
/// before that (gz refused its command line: the run it replaced is not lost for it).
fn settle_replaced_run(run: &Path, ok: bool) -> Result<()> {
    let backup = replaced_run(run);
    if !backup.exists() {
        return Ok(());
    }
    if ok || run.join("last.json").exists() {
        return clear_known(&backup, is_run_file, "training run");
    }
    if run.exists() {
        clear_known(run, is_run_file, "training run")?;
    }
    std::fs::rename(&backup, run)
        .with_context(|| format!("putting the run {} back from {}", run.display(), backup.display()))?;
    eprintln!(
        "xtask: train: the new run trained nothing: the run it was to replace is back in {}",
        run.display()
    );
    Ok(())
}

/// The number of training rows in the shard cache `cache` (its `manifest.json`), `None` when
/// it cannot be read (the stages that use the cache report it).
fn cache_train_rows(cache: &Path) -> Option<usize> {
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(cache.join("manifest.json")).ok()?).ok()?;
    m.get("splits")?
        .as_array()?
        .iter()
        .find(|s| s.get(0).and_then(|n| n.as_str()) == Some("train"))?
        .get(1)?
        .get("rows")?
        .as_u64()
        .and_then(|r| usize::try_from(r).ok())
}

/// The number of training images of a Kaggle-layout dataset (the JPEGs in
/// `images_training_rev1/`; 0 when it cannot be read: the stages report that folder).
fn training_images(data: &Path) -> usize {
    jpegs_in(&data.join("images_training_rev1"))
}

/// The `.jpg`/`.jpeg` files (any case) in `dir`; 0 when it cannot be read.
fn jpegs_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |rd| {
        rd.filter_map(|e| e.ok())
            .filter(|e| {
                e.file_type().is_ok_and(|t| !t.is_dir())
                    && Path::new(&e.file_name())
                        .extension()
                        .is_some_and(|x| x.eq_ignore_ascii_case("jpg") || x.eq_ignore_ascii_case("jpeg"))
            })
            .count()
    })
}

/// Name of the note xtask leaves in a training run directory: the command and inputs the run
/// was started with, so that an interrupted run is resumed rather than thrown away.
const TRAIN_NOTE: &str = ".xtask-train.json";

/// Before `gz train` runs (the stage is not up to date): a run of the same command on the same
/// inputs (its note matches) that finished all its epochs is kept ([`BeforeRun::Done`]: a kill
/// came between `gz train` and the stamp); one interrupted after an epoch (`last.json`) is
/// resumed with `--resume`, since `gz train` continues it exactly. Anything else in the run
/// directory, or anything at all with `--force`, is a stale run and goes, and the note of the
/// new run is written first.
fn train_before_run(run: &Path, flat: &[String], inputs: &[(String, String)], force: bool) -> Result<BeforeRun> {
    let note = serde_json::json!({ "command": flat, "inputs": inputs });
    let note_path = run.join(TRAIN_NOTE);
    let json = |p: &Path| {
        std::fs::read(p)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    };
    let old_note = json(&note_path);
    // (the same command with its options in another order is the same run)
    let same = old_note.as_ref().is_some_and(|old| {
        old.get("inputs") == note.get("inputs")
            && old
                .get("command")
                .and_then(|c| {
                    c.as_array()?
                        .iter()
                        .map(|w| w.as_str().map(String::from))
                        .collect::<Option<Vec<_>>>()
                })
                .is_some_and(|c| crate::stamp::same_command(&c, flat))
    });
    let last = run.join("last.json");
    let last_v = json(&last);
    let finished = last_v
        .as_ref()
        .and_then(|v| Some((v.get("epoch")?.as_u64()?, v.get("train")?.get("epochs")?.as_u64()?)))
        .is_some_and(|(done, of)| done >= of);
    // (a finished run whose best checkpoint is gone, deleted or never written, or damaged, is
    // trained again: a truncated one was kept as finished, and every eval after failed on it)
    let best = best_checkpoint_whole(run);
    // last.json counts its epoch as the best but best.json names an earlier one: the run stopped
    // between the two (a full disk), and `gz train --resume` writes that best
    let best_missed = last_v
        .as_ref()
        .and_then(|v| Some((v.get("epoch")?.as_u64()?, v.get("best_epoch")?.as_u64()?)))
        .is_some_and(|(epoch, best)| {
            epoch == best && json(&run.join("best.json")).and_then(|b| b.get("epoch")?.as_u64()) != Some(epoch)
        });
    if same && !force && finished && best && !best_missed {
        eprintln!("xtask: train: keeping the finished run {}", run.display());
        return Ok(BeforeRun::Done);
    }
    // killed between best.json and its rename: the resume moves the staged best into place
    let best_staged = !best && best_checkpoint_staged(run);
    if same && !force && last.exists() && (!finished || best_missed || best_staged) {
        if finished && best_staged && !best_missed {
            eprintln!(
                "xtask: train: resuming the finished run {} to move its best checkpoint into place (stopped before \
                 the rename)",
                run.display()
            );
        } else if finished {
            eprintln!(
                "xtask: train: resuming the finished run {} to write the best checkpoint it missed",
                run.display()
            );
        } else {
            eprintln!("xtask: train: resuming the interrupted run {}", run.display());
        }
        return Ok(BeforeRun::Run(vec!["--resume".into()]));
    }
    // a run started with other options, or on other inputs, starts over: said, with what
    // changed (an interrupted run of another --epochs is not resumed: the learning-rate
    // schedule follows the number of epochs, so it would not be the run these options give)
    if let Some(old) = old_note.as_ref().filter(|_| !same && !force && last.exists()) {
        eprintln!(
            "xtask: train: the run in {} was started with other options or inputs{}: training starts over",
            run.display(),
            note_change(old, flat)
        );
    }
    if run.exists() {
        let backup = replaced_run(run);
        let is_link = std::fs::symlink_metadata(run).is_ok_and(|m| m.file_type().is_symlink());
        if run.join("best.json").exists() && !is_link {
            // a finished run is put aside, not removed, until the new one has trained an
            // epoch: a command line only gz refuses (`--train-arg --bogus`, a --size too small
            // for the model) lost it before ([`run_train`] puts it back)
            check_known(run, is_run_file, "training run")?;
            if backup.exists() {
                clear_known(&backup, is_run_file, "training run")?;
            }
            std::fs::rename(run, &backup)
                .with_context(|| format!("putting the stale run {} aside as {}", run.display(), backup.display()))?;
            eprintln!(
                "xtask: train: put the stale run {} aside (removed once the new run has trained an epoch)",
                run.display()
            );
        } else {
            clear_known(run, is_run_file, "training run")?;
            eprintln!("xtask: train: replaced the stale run {}", run.display());
        }
    }
    std::fs::create_dir_all(run).with_context(|| format!("creating {}", run.display()))?;
    // through a temporary: a half-written note would count the run as stale at the next call
    crate::stamp::write_atomic(&note_path, format!("{note:#}\n").as_bytes())?;
    Ok(BeforeRun::Run(vec![]))
}

/// What differs between a run's note (`old`) and the command `flat`: ` (--epochs 6 → 5)`, or
/// ` (its inputs changed)` for the same command.
fn note_change(old: &serde_json::Value, flat: &[String]) -> String {
    let old_cmd: Option<Vec<String>> = old
        .get("command")
        .and_then(|c| c.as_array()?.iter().map(|w| w.as_str().map(String::from)).collect());
    match old_cmd {
        Some(c) if !crate::stamp::same_command(&c, flat) => crate::stamp::command_change(&c, flat),
        Some(_) => " (its inputs changed)".to_string(),
        None => String::new(),
    }
}

/// What a training run and xtask write into a run folder: `gz train`'s files
/// (`gz_model::train::RUN_FILES`, which xtask does not link), their staged (`NAME.new`) and
/// temporary versions (`NAME.tmpPID`, `.NAME.PID.tmp`), its lock, xtask's notes; and a desktop's
/// own files.
fn is_run_file(rel: &Path) -> bool {
    const RUN_FILES: [&str; 7] = [
        "last.safetensors",
        "last.optim.safetensors",
        "best.safetensors",
        "last.json",
        "best.json",
        "metrics.jsonl",
        "config.json",
    ];
    let Some(name) = rel.to_str().filter(|_| rel.components().count() == 1) else {
        return false;
    };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let temp_of = |n: &str| {
        let rest = name.strip_prefix(n);
        rest.is_some_and(|r| {
            r.is_empty()
                || r == ".new"
                || r.strip_prefix(".tmp").is_some_and(digits)
                || r.strip_prefix(".new.tmp").is_some_and(digits)
        }) || name
            .strip_prefix('.')
            .and_then(|r| r.strip_prefix(n))
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.strip_suffix(".tmp"))
            .is_some_and(digits)
    };
    RUN_FILES.iter().any(|n| temp_of(n))
        || name == ".gz-train.lock"
        || name.starts_with(".xtask-")
        || matches!(name, ".DS_Store" | "Thumbs.db" | "desktop.ini")
}

/// What `gz eval` writes into a report folder: `metrics.json`, `index.html`, its charts, the
/// gallery's thumbnails and mark, and their temporaries.
/// `K` of gz predict's summary line `N rows (K filled with the training mean), …` in a stage's
/// stdout.
fn filled_rows(stdout: &str) -> Option<usize> {
    stdout.lines().find_map(|l| {
        let (head, _) = l.split_once(" filled with the training mean)")?;
        head.rsplit_once('(')?.1.trim().parse().ok()
    })
}

/// Whether gz reads `device` (lower-cased, trimmed) as a device: cpu, cuda, gpu, auto, cuda:N
/// or gpu:N (`gz_model::device::parse_device`).
/// Whether `--device` asks for a GPU (`cuda`, `cuda:N`, `gpu`, `gpu:N`; a `gpu:1` slipped past
/// the up-front refusal and failed at `gz train`, after synth and prep).
fn device_wants_cuda(device: &str) -> bool {
    device == "cuda" || device == "gpu" || device.starts_with("cuda:") || device.starts_with("gpu:")
}

fn device_known(device: &str) -> bool {
    matches!(device, "cpu" | "cuda" | "gpu" | "auto")
        || device
            .strip_prefix("cuda:")
            .or_else(|| device.strip_prefix("gpu:"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn is_report_file(rel: &Path) -> bool {
    // (a name that is not UTF-8 is no name gz writes)
    let Some(parts) = rel.iter().map(|c| c.to_str()).collect::<Option<Vec<&str>>>() else {
        return false;
    };
    let png = |n: &str| n.to_ascii_lowercase().ends_with(".png");
    let temp = |n: &str| n.starts_with('.') && n.ends_with(".tmp");
    let desktop = |n: &str| matches!(n, ".DS_Store" | "Thumbs.db" | "desktop.ini");
    match parts.as_slice() {
        // (`.gz-eval.lock`: the lock file a killed or interrupted `gz eval` left, holding no lock)
        [n] => matches!(*n, "metrics.json" | "index.html" | ".gz-eval.lock") || png(n) || temp(n) || desktop(n),
        ["gallery", n] => png(n) || temp(n) || desktop(n) || *n == ".gz-gallery",
        _ => false,
    }
}

/// Empties `dir` of the files `ours` recognises (paths relative to `dir`) and removes it (a link
/// to a folder is kept, its target emptied), or, when it holds anything else (a user's notes, a
/// dataset, a cache, a folder of their own), refuses naming it and removes nothing: xtask
/// replaces what gz wrote, never the rest.
/// [`clear_known`]'s refusal without the removal: `dir` holds nothing but what `ours` says
/// gz or xtask wrote there.
fn check_known(dir: &Path, ours: fn(&Path) -> bool, what: &str) -> Result<()> {
    known_entries(dir, ours, what).map(|_| ())
}

fn clear_known(dir: &Path, ours: fn(&Path) -> bool, what: &str) -> Result<()> {
    let entries = known_entries(dir, ours, what)?;
    // a folder that is a link (to another disk) is emptied where it points and kept
    let link = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
    // what says the folder is finished first (a best checkpoint, the scores), the marks that it
    // is xtask's (its note) last: a removal failing halfway leaves a folder taken for unfinished
    let rank = |r: &Path| match r.to_str().unwrap_or_default() {
        "best.json" | "best.safetensors" | "last.json" | "metrics.json" => 0,
        n if n.starts_with('.') => 2,
        _ => 1,
    };
    let mut files: Vec<&PathBuf> = entries.iter().filter(|(_, d)| !d).map(|(r, _)| r).collect();
    files.sort_by_key(|r| rank(r));
    for r in files {
        std::fs::remove_file(dir.join(r)).with_context(|| format!("removing {}", dir.join(r).display()))?;
    }
    for (r, _) in entries.iter().filter(|(_, d)| *d) {
        std::fs::remove_dir(dir.join(r)).with_context(|| format!("removing {}", dir.join(r).display()))?;
    }
    if link {
        return Ok(());
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

/// The entries of `dir` (two levels deep; `(path relative to dir, is a folder)`), refused when
/// one is not what `ours` says gz or xtask wrote.
fn known_entries(dir: &Path, ours: fn(&Path) -> bool, what: &str) -> Result<Vec<(PathBuf, bool)>> {
    fn walk(dir: &Path, rel: &Path, depth: usize, out: &mut Vec<(PathBuf, bool)>) -> Result<()> {
        for e in std::fs::read_dir(dir.join(rel)).with_context(|| format!("listing {}", dir.join(rel).display()))? {
            let e = e.with_context(|| format!("listing {}", dir.join(rel).display()))?;
            let r = rel.join(e.file_name());
            let t = e
                .file_type()
                .with_context(|| format!("reading {}", e.path().display()))?;
            if t.is_dir() && depth < 2 {
                walk(dir, &r, depth + 1, out)?;
                out.push((r, true));
            } else {
                out.push((r, t.is_dir()));
            }
        }
        Ok(())
    }
    let mut entries = Vec::new();
    walk(dir, Path::new(""), 0, &mut entries)?;
    let foreign: Vec<String> = entries
        .iter()
        .filter(|(r, is_dir)| !is_dir && !ours(r))
        .map(|(r, _)| r.display().to_string())
        .chain(
            // a folder is ours only as what it holds says (the gallery of a report)
            entries
                .iter()
                .filter(|(r, is_dir)| *is_dir && !ours(&r.join("x.png")))
                .map(|(r, _)| format!("{}/", r.display())),
        )
        .collect();
    if !foreign.is_empty() {
        let n = foreign.len();
        let shown: Vec<&str> = foreign.iter().take(3).map(String::as_str).collect();
        bail!(
            "{} holds {} that no {what} wrote ({}{}): xtask replaces only what gz wrote there; move {} out (or \
             choose another --name or --root)",
            dir.display(),
            if n == 1 {
                "an entry".to_string()
            } else {
                format!("{n} entries")
            },
            shown.join(", "),
            if n > 3 { ", …" } else { "" },
            if n == 1 { "it" } else { "them" }
        );
    }
    Ok(entries)
}

/// Where a stale finished run waits while its replacement trains: `runs/.NAME.replaced`.
fn replaced_run(run: &Path) -> PathBuf {
    let name = run
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    run.with_file_name(format!(".{name}.replaced"))
}

/// Whether `run` holds a best checkpoint whose weights match the CRC-32 its sidecar records
/// (`best.json`'s `weights_crc32`, as gz checks when it loads them).
fn best_checkpoint_whole(run: &Path) -> bool {
    best_weights_match(run, "best.safetensors")
}

/// Whether `best.json`'s weights wait under their staged name (`best.safetensors.new`): the run
/// was killed between that sidecar and the rename, and `gz train --resume` finishes it.
fn best_checkpoint_staged(run: &Path) -> bool {
    best_weights_match(run, "best.safetensors.new")
}

/// Whether `run/file`'s CRC-32 is the one `best.json` names.
fn best_weights_match(run: &Path, file: &str) -> bool {
    let Some(want) = std::fs::read(run.join("best.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("weights_crc32")?.as_u64())
    else {
        return false;
    };
    let Ok(mut f) = std::fs::File::open(run.join(file)) else {
        return false;
    };
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match std::io::Read::read(&mut f, &mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(_) => return false,
        }
    }
    u64::from(h.finalize()) == want
}

fn run_identity(run: &Path) -> Result<String> {
    fingerprint::identity_of(run, &["best.safetensors", "best.json"])
}

fn run_eval(ctx: &mut Ctx) -> Result<Done> {
    let cache = ctx.cache()?;
    let run = ctx.need_current_run(&cache)?;
    let data = ctx.data_dir();
    let report = ctx.report_dir();
    let eval = |report: &Path| {
        let mut cmd: Vec<String> = vec![
            "eval".into(),
            "--run".into(),
            Ctx::s(&run),
            "--cache".into(),
            Ctx::s(&cache),
            "--data".into(),
            Ctx::s(&data),
            "--device".into(),
            ctx.device.clone(),
            "--report".into(),
            Ctx::s(report),
        ];
        if let Some(t) = ctx.tta {
            cmd.extend(["--tta".into(), t.to_string()]);
        }
        cmd
    };
    // with the test split's labels (a synthetic set), its score first, as the leaderboard would
    // give it (report in <report>/test/); then the validation report, whose lines xtask reads
    let mut cmds = Vec::new();
    let test_report = report.join("test");
    let scores_test = data.join("test_solutions.csv").is_file();
    if scores_test {
        let mut test = eval(&test_report);
        test.extend(["--split".into(), "test".into()]);
        cmds.push(test);
    }
    cmds.push(eval(&report));
    // the dataset's optional labels score the test split and give the floor: a changed one
    // reruns the stage
    let inputs = vec![
        ("run".to_string(), run_identity(&run)?),
        ("cache".to_string(), fingerprint::identity(&cache)?),
        (
            "labels".to_string(),
            fingerprint::identity_of(
                &data,
                &[
                    "test_solutions.csv",
                    "expected_test.csv",
                    "expected_training.csv",
                    "floor.json",
                ],
            )?,
        ),
    ];
    let root = ctx.root.clone();
    stage(
        ctx,
        "eval",
        &run.join("eval"),
        cmds,
        inputs,
        move |_| {
            // a test report of an earlier dataset must not outlive it (its score was printed as
            // this run's)
            if !scores_test && test_report.exists() {
                clear_known(&test_report, is_report_file, "report")
                    .with_context(|| format!("the stale test report {}", test_report.display()))?;
            }
            Ok(BeforeRun::Run(vec![]))
        },
        move |stdout| {
            // gz eval names its report page on its last line (`report: <dir>/index.html`)
            let printed = gz::result_line(stdout, "report").map(|r| absolute(PathBuf::from(r), &root));
            let dir = match printed {
                Some(p) if p.is_file() => p.parent().map_or(report.clone(), Path::to_path_buf),
                Some(p) => p,
                None => report,
            };
            // (the test report's scores are printed too: one edited or gone reruns the stage, as
            // does a page or chart of either report, which the summary names: a deleted test
            // page was "up to date" and named as written)
            Ok(vec![Output::new("report", &dir, &REPORT_MEMBERS)])
        },
    )
}

/// The files of the eval stage's reports its stamp covers (those absent when stamped, a chart
/// a report has no data for, count as absent).
const REPORT_MEMBERS: [&str; 10] = [
    "metrics.json",
    "index.html",
    "per_question.png",
    "learning_curve.png",
    "spread.png",
    "test/metrics.json",
    "test/index.html",
    "test/per_question.png",
    "test/learning_curve.png",
    "test/spread.png",
];

fn run_submit(ctx: &mut Ctx) -> Result<Done> {
    let cache = ctx.cache()?;
    let run = ctx.need_current_run(&cache)?;
    let (preds, sub) = (ctx.predictions(), ctx.submission());
    let mut predict = vec![
        "predict".into(),
        "--run".into(),
        Ctx::s(&run),
        "--cache".into(),
        Ctx::s(&cache),
        "--device".into(),
        ctx.device.clone(),
        "--out".into(),
        Ctx::s(&preds),
        // a test image prep skipped (unreadable) gets the training mean's row, named on stderr
        // (without it, predict refuses to leave the row out)
        "--fill-mean".into(),
    ];
    if let Some(t) = ctx.tta {
        predict.extend(["--tta".into(), t.to_string()]);
    }
    // --ids: the submission must have exactly the test images' ids
    let ids = ctx.data_dir().join("images_test_rev1");
    // --fill-mean: a row missing from the predictions gets the training mean and is listed;
    // with every image predicted (predict fills the ones prep skipped) it changes nothing
    let submit = vec![
        "submit".into(),
        "--pred".into(),
        Ctx::s(&preds),
        "--ids".into(),
        Ctx::s(&ids),
        "--fill-mean".into(),
        "--out".into(),
        Ctx::s(&sub),
    ];
    let inputs = vec![
        ("run".to_string(), run_identity(&run)?),
        ("cache".to_string(), fingerprint::identity(&cache)?),
    ];
    let dir = ctx.report_dir();
    stage(
        ctx,
        "submit",
        &sub,
        vec![predict, submit],
        inputs,
        move |_| {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            Ok(BeforeRun::Run(vec![]))
        },
        |_| {
            Ok(vec![
                Output::new("predictions", &preds, &[]),
                Output::new("submission", &sub, &[]),
            ])
        },
    )
}

fn run_one(ctx: &mut Ctx, name: &str) -> Result<Done> {
    match name {
        "synth" => run_synth(ctx),
        "prep" => run_prep(ctx),
        "train" => run_train(ctx),
        "eval" => run_eval(ctx),
        "submit" => run_submit(ctx),
        other => bail!("unknown stage {other}"),
    }
}

fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root)
        .map_or_else(|_| p.display().to_string(), |r| r.display().to_string())
}

fn summary(ctx: &Ctx, done: &[Done]) {
    if done.is_empty() {
        return;
    }
    println!("\nstages (artifacts under {}):", ctx.root.display());
    for d in done {
        let outs: Vec<String> = d
            .stamp
            .outputs
            .iter()
            .map(|(o, _)| format!("{} {}", o.label, rel(&ctx.root, &o.path)))
            .collect();
        println!(
            "  {:<7} {:<11} {}",
            d.stage,
            if d.ran { "ran" } else { "up to date" },
            outs.join(", ")
        );
    }
}

/// `cargo xtask pipeline`.
/// With `--cache`: the dataset the cache's manifest says it was built from must be this run's
/// (else training goes ahead and eval fails on foreign ids). Unknown or unresolvable: no check.
fn check_cache_dataset(ctx: &Ctx) -> Result<()> {
    let Some(cache) = &ctx.cache_override else {
        return Ok(());
    };
    let manifest = cache.join("manifest.json");
    let Ok(text) = std::fs::read(&manifest) else {
        return Ok(());
    };
    let built_from = serde_json::from_slice::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("extra")?.get("data_dir")?.as_str().map(PathBuf::from));
    let (Some(built_from), data) = (built_from, ctx.data_dir()) else {
        return Ok(());
    };
    // (this run's synthetic set may not exist yet: its path as it will be, so that a cache of
    // another root's set is refused before synth generates this one, not after)
    let data = data.canonicalize().or_else(|_| Ok::<_, std::io::Error>(data.clone()));
    if let (Ok(a), Ok(b)) = (built_from.canonicalize(), data) {
        if a != b {
            bail!(
                "--cache {} was built from {}, not from this run's dataset {} (pass --data {} to use it)",
                cache.display(),
                a.display(),
                b.display(),
                crate::gz::shell_words(&[a.display().to_string()])
            );
        }
    }
    Ok(())
}

pub fn cmd_pipeline(args: Args) -> Result<()> {
    let mut ctx = Ctx::parse(args)?;
    if ctx.real_data.is_none() && ctx.synth_test == 0 {
        bail!(
            "--test 0: the pipeline ends by predicting the test images for a submission, so it needs at least one \
             (`cargo xtask synth|prep|train` run without them)"
        );
    }
    // said before any stage runs (at Kaggle scale, after a full prep and training, the submit
    // stage failed on them)
    if let Some(d) = ctx.real_data.clone() {
        // (its layout first: a folder that is no dataset at all is said as such)
        ctx.dataset_identity()?;
        if jpegs_in(&d.join("images_test_rev1")) == 0 {
            bail!(
                "{} has no test JPEGs in images_test_rev1/: the pipeline ends by predicting them for a submission \
                 (`cargo xtask prep|train|eval` run without them)",
                d.display()
            );
        }
    }
    check_cache_dataset(&ctx)?;
    let mut done: Vec<Done> = Vec::new();
    let wanted: Vec<&str> = STAGES
        .iter()
        .copied()
        .filter(|s| !(ctx.real_data.is_some() && *s == "synth"))
        .filter(|s| !(ctx.cache_override.is_some() && *s == "prep"))
        .collect();
    if let Some(d) = &ctx.real_data {
        eprintln!("xtask: dataset {} (synth skipped)", d.display());
    }
    if let Some(c) = &ctx.cache_override {
        // its cache would go unused: train, eval and submit read --cache
        eprintln!("xtask: cache {} (prep skipped)", c.display());
    }
    for s in wanted {
        match run_one(&mut ctx, s) {
            Ok(d) => done.push(d),
            Err(e) => {
                summary(&ctx, &done);
                return Err(e.context(format!("pipeline stopped at `{s}`")));
            }
        }
    }
    summary(&ctx, &done);
    if let Some(eval) = done.iter().find(|d| d.stage == "eval") {
        if !eval.ran && !eval.stamp.stdout.trim().is_empty() {
            println!(
                "\nscores (from the last eval, up to date):\n{}",
                eval.stamp.stdout.trim_end()
            );
        }
    }
    let report = done
        .iter()
        .find_map(|d| d.stamp.output("report"))
        .map(Path::to_path_buf)
        .unwrap_or_else(|| ctx.report_dir());
    let sub = done
        .iter()
        .find_map(|d| d.stamp.output("submission"))
        .map(Path::to_path_buf)
        .unwrap_or_else(|| ctx.submission());
    print_scores(&report);
    // rows the submission holds that no model predicted (test images prep could not read):
    // said beside the scores, before the two paths (the last word on them was submit's "0 rows
    // filled", its predictions being filled already)
    if let Some(n) = done
        .iter()
        .find(|d| d.stage == "submit")
        .and_then(|d| filled_rows(&d.stamp.stdout))
        .filter(|&n| n > 0)
    {
        println!(
            "note: {} of the submission {} the training mean: test {} prep could not read (named above, and on \
             the `skipped:` lines of prep)",
            if n == 1 {
                "1 row".to_string()
            } else {
                format!("{n} rows")
            },
            if n == 1 { "is" } else { "are" },
            if n == 1 { "image" } else { "images" }
        );
    }
    println!("submission: {}", sub.display());
    let page = report.join("index.html");
    println!("report: {}", if page.is_file() { page } else { report }.display());
    Ok(())
}

/// `RMSE: validation X (N rows), test Y (M rows); Bayes floor …` from the eval reports'
/// `metrics.json` (`<report>/` and, with test labels, `<report>/test/`), when readable, with a
/// warning for each score no better than the training mean's on the same rows.
fn scores_line(report: &Path) -> Option<(String, Vec<String>)> {
    /// (split, RMSE, rows, Bayes floor, training mean's RMSE) of one report.
    type Score = (String, f64, u64, Option<f64>, Option<f64>);
    let read = |dir: PathBuf| -> Option<Score> {
        let text = std::fs::read_to_string(dir.join("metrics.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let scores = v.get("model")?.get("scores")?;
        // the "training mean" baseline's RMSE on the same rows
        let mean = v
            .get("baselines")
            .and_then(serde_json::Value::as_array)
            .and_then(|b| {
                b.iter()
                    .find(|b| b.get("name").and_then(serde_json::Value::as_str) == Some("training mean"))
            })
            .and_then(|b| b.get("scores")?.get("rmse")?.as_f64());
        let split = v.get("split")?.as_str()?;
        let split = if split.starts_with("test") {
            "test"
        } else {
            "validation"
        };
        let floor = v
            .get("floor")
            .and_then(|f| f.get("rmse"))
            .and_then(serde_json::Value::as_f64);
        Some((
            split.to_string(),
            scores.get("rmse")?.as_f64()?,
            scores.get("rows")?.as_u64()?,
            floor,
            mean,
        ))
    };
    let found: Vec<_> = [report.to_path_buf(), report.join("test")]
        .into_iter()
        .filter_map(read)
        .collect();
    if found.is_empty() {
        return None;
    }
    let scores: Vec<String> = found
        .iter()
        .map(|(s, r, n, ..)| format!("{s} {r:.5} ({n} {})", if *n == 1 { "row" } else { "rows" }))
        .collect();
    let floors: Vec<String> = found
        .iter()
        .filter_map(|(_, _, _, f, _)| f.map(|f| format!("{f:.5}")))
        .collect();
    let floor = if floors.is_empty() {
        String::new()
    } else {
        format!("; Bayes floor {}", floors.join(" / "))
    };
    // real data has no test labels: say where the test score comes from
    let no_test = if found.iter().any(|(s, ..)| s == "test") {
        ""
    } else {
        " (no test score: the test images have no labels here; Kaggle scores the submission)"
    };
    // a model no better than the constant it should beat is said in words, not left to the
    // reader's arithmetic against the eval table
    let warnings = found
        .iter()
        .filter_map(|(s, r, _, _, mean)| {
            let mean = mean.filter(|m| r >= m)?;
            Some(format!(
                "warning: the {s} RMSE {r:.5} is no better than predicting the training mean ({mean:.5}): the model \
                 has not learnt more than the mean; more epochs, a lower learning rate or more data may help"
            ))
        })
        .collect();
    Some((format!("RMSE: {}{floor}{no_test}", scores.join(", ")), warnings))
}

/// Prints [`scores_line`]'s line (stdout) and its warnings right after it (stderr).
fn print_scores(report: &Path) {
    if let Some((line, warnings)) = scores_line(report) {
        println!("{line}");
        for w in warnings {
            eprintln!("{w}");
        }
    }
}

/// `cargo xtask <stage>`: that stage alone, its inputs from `--cache` / `--name` or the stamps.
pub fn cmd_stage(name: &str, args: Args) -> Result<()> {
    let mut ctx = Ctx::parse(args)?;
    let d = run_one(&mut ctx, name)?;
    summary(&ctx, std::slice::from_ref(&d));
    if name == "eval" {
        if let Some(report) = d.stamp.output("report") {
            print_scores(report);
        }
    }
    for (o, _) in &d.stamp.outputs {
        // (a report by its page, as the pipeline's last line names it)
        let page = o.path.join("index.html");
        let shown = if o.label == "report" && page.is_file() {
            page
        } else {
            o.path.clone()
        };
        println!("{}: {}", o.label, shown.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A validation RMSE worse than the training mean's gets a warning line after the scores
    /// (the table of `gz eval` was the only place to see it).
    #[test]
    fn a_model_worse_than_the_mean_is_warned_of() {
        let t = tempfile::tempdir().unwrap();
        let write = |model: f64| {
            let v = serde_json::json!({
                "split": "validation hold-out of the training split (seed 0): 1 image of 3 (33.3%; --val-fraction 0.1 asked for 10%)",
                "model": {"name": "r", "scores": {"rows": 1, "rmse": model}},
                "baselines": [
                    {"name": "all zeros", "scores": {"rows": 1, "rmse": 0.28}},
                    {"name": "training mean", "scores": {"rows": 1, "rmse": 0.15862}},
                ],
                "floor": null,
            });
            std::fs::write(t.path().join("metrics.json"), v.to_string()).unwrap();
            scores_line(t.path()).unwrap()
        };
        let (line, warnings) = write(0.37332);
        assert!(line.starts_with("RMSE: validation 0.37332 (1 row)"), "{line}");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with(
                "warning: the validation RMSE 0.37332 is no better than predicting the training mean (0.15862)"
            ),
            "{warnings:?}"
        );
        let (_, warnings) = write(0.1);
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    /// The CPU recipe goes to `gz train` for `tiny` on the CPU only, and an explicit
    /// `--train-arg` of the same option replaces the recipe's value instead of repeating it.
    #[test]
    fn the_cpu_recipe_applies_to_tiny_on_the_cpu() {
        let t = tempfile::tempdir().unwrap();
        let cmd = |extra: &[&str]| {
            let ctx = Ctx::parse(fake_gz_args(t.path(), extra)).unwrap();
            train_command(&ctx, Path::new("/c"), Path::new("/r")).join(" ")
        };
        let default = cmd(&[]);
        assert!(
            default.contains("--model tiny --epochs 40 ")
                && default.contains("--batch 16 --no-augment --lr 2e-3 --schedule dieleman --patience 0"),
            "{default}"
        );
        let mine = cmd(&["--train-arg=--lr", "--train-arg=1e-3", "--epochs", "5", "--augment"]);
        assert_eq!(mine.matches("--lr").count(), 1, "{mine}");
        assert!(
            mine.ends_with("--lr 1e-3") && mine.contains("--epochs 5 ") && !mine.contains("augment"),
            "{mine}"
        );
        for other in [&["--model", "vgg16-blog"][..], &["--device", "cuda"]] {
            let c = cmd(other);
            assert!(
                !c.contains("--lr")
                    && !c.contains("--schedule")
                    && c.contains("--epochs 12 ")
                    && !c.contains("augment"),
                "{c}"
            );
        }
        assert!(cmd(&["--model", "vgg16-blog", "--no-augment"]).contains("--no-augment"));
        // a passed-through word that looks like one of xtask's options is gz's
        let through = cmd(&["--train-arg", "--seed=5", "--train-arg", "--batch=4", "--epochs", "3"]);
        assert!(
            through.ends_with("--seed=5 --batch=4")
                && through.contains("--epochs 3 ")
                && !through.contains("--batch 16"),
            "{through}"
        );
        // --train-arg --augment undoes the recipe's --no-augment
        let aug = cmd(&["--train-arg", "--augment"]);
        assert!(aug.ends_with("--augment") && !aug.contains("--no-augment"), "{aug}");
        // a large training set gets `small` with the same recipe, below the threshold `tiny`;
        // an explicit --model small gets the recipe whatever the size
        let recipe = "--batch 16 --no-augment --lr 2e-3 --schedule dieleman --patience 0";
        let from = CPU_SMALL_FROM.to_string();
        let below = (CPU_SMALL_FROM - 1).to_string();
        for (extra, model) in [
            (&["--train", &from][..], "small"),
            (&["--train", &below], "tiny"),
            (&["--model", "small"], "small"),
        ] {
            let c = cmd(extra);
            assert!(
                c.contains(&format!("--model {model} --epochs 40 ")) && c.contains(recipe),
                "{extra:?}: {c}"
            );
        }
        // a set of that size trained on fewer (`--train-arg --max-train`) gets the net for fewer
        for (max, model) in [(&below, "tiny"), (&from, "small")] {
            for extra in [
                vec![
                    "--train".to_string(),
                    "20000".into(),
                    "--train-arg".into(),
                    format!("--max-train={max}"),
                ],
                vec![
                    "--train".to_string(),
                    "20000".into(),
                    "--train-arg".into(),
                    "--max-train".into(),
                    "--train-arg".into(),
                    max.clone(),
                ],
            ] {
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                let c = cmd(&extra);
                assert!(c.contains(&format!("--model {model} --epochs 40 ")), "{extra:?}: {c}");
            }
        }
        // dieleman-tiny: the recipe at 1e-3 (on 64 px: the prep stage's size below)
        let d = cmd(&["--model", "dieleman-tiny"]);
        assert!(
            d.contains("--model dieleman-tiny --epochs 40 ")
                && d.contains("--batch 16 --no-augment --lr 1e-3 --schedule dieleman --patience 0"),
            "{d}"
        );
        assert!(cmd(&["--model", "dieleman"]).contains("--model dieleman --epochs 12 "));
        let size = |extra: &[&str]| Ctx::parse(fake_gz_args(t.path(), extra)).unwrap().size;
        assert_eq!(size(&["--model", "dieleman-tiny"]), Some(64));
        assert_eq!(size(&["--model", "dieleman-tiny", "--size", "48"]), Some(48));
        assert_eq!(size(&[]), Some(32));
        assert_eq!(size(&["--model", "dieleman"]), Some(32));
        assert_eq!(size(&["--model", "dieleman-tiny", "--device", "cuda"]), None);
        // not on CUDA (the stages' own defaults)
        assert!(cmd(&["--train", &from, "--device", "cuda"]).contains("--model tiny --epochs 12 "));
    }

    /// The generator version comes from the gz binary; a gz without the option (a usage error,
    /// exit status 2) draws version 1, and a gz that fails otherwise is an error, not version 1
    /// (which would regenerate the set and rerun every stage after it).
    #[cfg(unix)]
    #[test]
    fn the_generator_version_is_asked_of_gz() {
        use std::os::unix::fs::PermissionsExt as _;
        let t = tempfile::tempdir().unwrap();
        let fake = |name: &str, body: &str| {
            let p = t.path().join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        assert_eq!(generator_version(&fake("new", "echo 2")).unwrap(), "2");
        let old = fake(
            "old",
            "echo \"error: unexpected argument '--generator-version' found\" >&2; exit 2",
        );
        assert_eq!(generator_version(&old).unwrap(), "1");
        let stub = fake("stub", "echo 'error: `gz synth` is not built yet' >&2; exit 1");
        assert_eq!(
            generator_version(&stub).unwrap_err().to_string(),
            "`gz synth` is not built yet"
        );
        let e = generator_version(&fake("broken", "echo 'killed' >&2; exit 137")).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("synth --generator-version failed") && e.contains("killed"),
            "{e}"
        );
    }

    /// A real dataset's size is the number of JPEGs in images_training_rev1/ (any case of
    /// `.jpg`/`.jpeg`, nothing else); a missing folder counts 0 (the stages report it).
    #[test]
    fn training_images_are_the_jpegs_of_the_training_folder() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(training_images(t.path()), 0);
        let dir = t.path().join("images_training_rev1");
        std::fs::create_dir_all(dir.join("sub.jpg")).unwrap();
        for f in ["1.jpg", "2.JPG", "3.jpeg", "4.png", "notes.txt"] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        assert_eq!(training_images(t.path()), 3);
        // a cache's training rows are read from its manifest; with --cache they size the net
        let cache = t.path().join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        assert_eq!(cache_train_rows(&cache), None);
        let manifest = |rows: usize| {
            let m = serde_json::json!({"splits": [["test", {"rows": 9}], ["train", {"rows": rows}]]});
            std::fs::write(cache.join("manifest.json"), m.to_string()).unwrap();
        };
        let model = |extra: &[&str]| Ctx::parse(fake_gz_args(t.path(), extra)).unwrap().model;
        let c = cache.display().to_string();
        manifest(CPU_SMALL_FROM);
        assert_eq!(cache_train_rows(&cache), Some(CPU_SMALL_FROM));
        assert_eq!(model(&["--cache", &c]), "small");
        manifest(CPU_SMALL_FROM - 1);
        assert_eq!(model(&["--cache", &c, "--train", "60000"]), "tiny");
        // an unreadable manifest: the dataset's size decides
        std::fs::write(cache.join("manifest.json"), "{").unwrap();
        assert_eq!(model(&["--cache", &c, "--train", "60000"]), "small");
    }

    /// `--device cuda` (or `gpu`) with the gz xtask builds is refused up front unless that build
    /// has CUDA (`--cuda`), as is `--cudnn` without `--cuda`; a gz given with `--gz` is taken
    /// as it is. Before, prep ran first and `gz train` then failed advising `cargo xtask build
    /// --cuda`, which does not change the pipeline's gz; `--cudnn` alone was ignored.
    #[test]
    fn a_cuda_device_needs_the_cuda_build() {
        let t = tempfile::tempdir().unwrap();
        let parse = |extra: &[&str]| {
            let mut v = vec!["--root".to_string(), t.path().display().to_string()];
            v.extend(extra.iter().map(|s| s.to_string()));
            Ctx::parse(Args::new(v))
        };
        for device in ["cuda", "cuda:1", "gpu", "gpu:1"] {
            let e = parse(&["--device", device]).err().unwrap().to_string();
            assert!(
                e.contains(&format!("--device {device} needs gz built with CUDA: add --cuda")),
                "{e}"
            );
        }
        // the command line is read to its end before the CUDA toolkit is set up (on first use of
        // gz): a typo or a bad value after --cuda is reported at once, with nothing installed
        for (bad, says) in [
            (&["--cuda", "--bogus"][..], "unexpected argument: --bogus"),
            (&["--cuda", "--cudnn", "--epochs", "x"], "option --epochs: cannot read"),
        ] {
            let e = parse(bad).err().unwrap().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        let ctx = parse(&["--cuda", "--device", "cuda"]).unwrap();
        assert!(matches!(ctx.gz, GzSource::Build { cuda: true, .. }), "{:?}", ctx.gz);
        let e = parse(&["--cudnn"]).err().unwrap().to_string();
        assert!(e.contains("pass --cuda --cudnn"), "{e}");
        assert!(parse(&["--device", "cuda", "--gz", "/bin/true"]).is_ok());
        assert!(parse(&["--device", "cpu"]).is_ok());
        assert_eq!(
            filled_rows("500 rows (2 filled with the training mean), 8 TTA views\nsubmission …"),
            Some(2)
        );
        assert_eq!(
            filled_rows("3 rows, 0 clipped to [0, 1], 0 filled with the training mean"),
            None
        );
        // a device gz would refuse is said as such, not sent to build CUDA for it
        let e = parse(&["--device", "cuda:x"]).err().unwrap().to_string();
        assert!(e.contains("--device cuda:x: expected cpu, cuda, cuda:N or auto"), "{e}");
    }

    /// `--cache` of another dataset than the run's is refused when the cache is asked for
    /// (before training), naming where it came from; the cache of the run's dataset passes.
    #[test]
    fn a_cache_of_another_dataset_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let (a, b, cache) = (t.path().join("set a"), t.path().join("b"), t.path().join("cache"));
        for d in [&a, &b, &cache] {
            std::fs::create_dir_all(d).unwrap();
        }
        let manifest = serde_json::json!({"extra": {"data_dir": a}});
        std::fs::write(cache.join("manifest.json"), manifest.to_string()).unwrap();
        let ctx = |data: &Path| {
            Ctx::parse(Args::new(
                [
                    "--root",
                    &t.path().display().to_string(),
                    "--gz",
                    "/bin/true",
                    "--data",
                    &data.display().to_string(),
                    "--cache",
                    &cache.display().to_string(),
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ))
            .unwrap()
        };
        let err = ctx(&b).cache().unwrap_err().to_string();
        // the path to pass is quoted: it holds a space
        let pass = format!("pass --data '{}'", a.canonicalize().unwrap().display());
        assert!(err.contains("was built from") && err.contains(&pass), "{err}");
        assert_eq!(ctx(&a).cache().unwrap(), cache);
        // without --data (this root's synthetic set, not generated yet): refused up front too,
        // not after synth has generated the set
        let root = t.path().join("root");
        let synth_ctx = Ctx::parse(Args::new(
            [
                "--root",
                &root.display().to_string(),
                "--gz",
                "/bin/true",
                "--cache",
                &cache.display().to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ))
        .unwrap();
        let err = check_cache_dataset(&synth_ctx).unwrap_err().to_string();
        assert!(err.contains("was built from"), "{err}");
    }

    /// `cargo xtask eval` while a pipeline in the same root trains the run says the root is in
    /// use (it said the run was interrupted and to run `cargo xtask train`).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_stage_beside_a_running_pipeline_says_the_root_is_in_use() {
        let t = tempfile::tempdir().unwrap();
        let ctx = Ctx::parse(fake_gz_args(t.path(), &[])).unwrap();
        let run = ctx.run_dir();
        std::fs::create_dir_all(&run).unwrap();
        for f in ["best.safetensors", "best.json", TRAIN_NOTE] {
            std::fs::write(run.join(f), "{}").unwrap();
        }
        // another process holds the root's lock (flock(1), where the system has it; this
        // process, once it holds it, holds it to its end)
        let lock = t.path().join(crate::lock::LOCK_FILE);
        let Ok(mut holder) = std::process::Command::new("flock")
            .arg(&lock)
            .args(["sleep", "30"])
            .spawn()
        else {
            return;
        };
        let mut busy = String::new();
        for _ in 0..100 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            busy = match std::process::Command::new("flock")
                .args(["-n"])
                .arg(&lock)
                .arg("true")
                .status()
            {
                Ok(s) if !s.success() => {
                    let e = ctx.need_run().unwrap_err().to_string();
                    if e.contains("is in use") {
                        e
                    } else {
                        format!("not said: {e}")
                    }
                }
                _ => continue,
            };
            break;
        }
        let _ = holder.kill();
        let _ = holder.wait();
        assert!(busy.contains("is in use"), "{busy}");
    }

    /// Option values gz would refuse only when its stage comes (after synth, prep, or the whole
    /// training) are refused by xtask before anything is created; so is a root among the
    /// dataset's images.
    #[test]
    fn bad_values_are_refused_before_any_stage() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let data = t.path().join("data");
        std::fs::create_dir_all(data.join("images_training_rev1")).unwrap();
        let long = "n".repeat(300);
        let not_a_cache = t.path().join("not-a-cache");
        std::fs::create_dir_all(&not_a_cache).unwrap();
        let not_a_cache = not_a_cache.display().to_string();
        let cases: [(&[&str], &str); 20] = [
            (&["--model", "nosuch"], "--model nosuch: expected one of"),
            (&["--device", "tpu"], "--device tpu: expected cpu, cuda, cuda:N or auto"),
            (&["--precision", "bf16"], "--precision bf16 needs a CUDA device"),
            (&["--train", "0"], "--train must be at least 1"),
            (&["--cache", &not_a_cache], "not a shard cache (no manifest.json)"),
            (&["--device", "cuda:"], "expected cpu, cuda"),
            (&["--precision", "f16"], "--precision f16: expected f32 or bf16"),
            (&["--epochs", "0"], "--epochs must be at least 1"),
            (&["--batch", "0"], "--batch must be at least 1"),
            (&["--size", "0"], "--size must be at least 1"),
            (
                &["--size", "300"],
                "--size 300 is larger than the centre crop it is taken from (212 pixels of the 424; `--prep-arg \
                 --crop N` sets it): at most 212",
            ),
            (
                &["--size", "300", "--prep-arg", "--crop=250"],
                "--size 300 is larger than the centre crop it is taken from (250 pixels",
            ),
            (
                &["--size", "300", "--prep-arg", "--crop", "--prep-arg", "299"],
                "(299 pixels",
            ),
            (&["--tta", "3"], "--tta 3: expected a preset"),
            (
                &["--prep-arg", "--size", "--prep-arg", "48"],
                "--prep-arg --size: the stage sets --size itself (pass --size N",
            ),
            (
                &["--prep-arg=--cache=/c"],
                "--prep-arg --cache: the stage sets --cache itself",
            ),
            (
                &["--train-arg", "--out", "--train-arg", "r"],
                "--train-arg --out: the stage sets --out itself",
            ),
            (
                &["--prep-arg", "--crop", "--prep-arg", "0"],
                "--prep-arg --crop 0: the centre crop is 1 to 424",
            ),
            (&["--cache", "/no/such/cache"], "--cache /no/such/cache: no such folder"),
            (&["--name", &long], "is 300 bytes, at most 200"),
        ];
        for (extra, want) in cases {
            let e = Ctx::parse(fake_gz_args(&root, extra)).expect_err("refused").to_string();
            assert!(e.contains(want), "{extra:?}: {e}");
        }
        let inside = data.join("images_training_rev1/r");
        let mut v = vec!["--gz".to_string(), "/bin/true".into(), "--root".into()];
        v.extend([
            inside.display().to_string(),
            "--data".into(),
            data.display().to_string(),
        ]);
        let e = Ctx::parse(Args::new(v)).expect_err("refused").to_string();
        assert!(e.contains("lies inside the dataset's image folder"), "{e}");
        assert!(!root.exists() && !inside.exists());
        let file = t.path().join("afile");
        std::fs::write(&file, "x").unwrap();
        for r in [file.clone(), file.join("sub")] {
            let e = Ctx::parse(fake_gz_args(&r, &[])).expect_err("refused").to_string();
            assert!(e.contains("afile is not a folder"), "{e}");
        }
        // what gz reads too: any case, `gpu`, `fp32`
        for ok in [
            &["--device", "cuda:1", "--tta", "60"][..],
            &["--device", "GPU:1", "--precision", "bf16"],
            &["--device", " Gpu ", "--precision", "FP32"],
        ] {
            assert!(Ctx::parse(fake_gz_args(&root, ok)).is_ok(), "{ok:?}");
        }
    }

    /// A stage run alone uses the cache of the last prep only when the current options give the
    /// same synth and prep commands (and inputs): `train --size 40` after a 24 px prep, or
    /// `train --seed 8` after a seed-7 synthetic set, is refused naming the stage to run first,
    /// and prep without a synthetic set says to run synth (it said "not a dataset in Kaggle
    /// layout"). Before, the stale cache was used without a word.
    #[test]
    fn a_stage_alone_refuses_upstream_artifacts_of_other_options() {
        let t = tempfile::tempdir().unwrap();
        let parse = |extra: &[&str]| Ctx::parse(fake_gz_args(t.path(), extra)).unwrap();
        let opts = ["--seed", "7", "--size", "24"];
        let mut ctx = parse(&opts);
        let e = ctx.dataset_identity().unwrap_err().to_string();
        // (with the options given: pasted without them it ran in the repository, at other sizes)
        let want = format!(
            "run `cargo xtask synth --root {} --gz /bin/true --seed 7 --size 24` first",
            t.path().display()
        );
        assert!(e.contains(&want), "{e}");
        // real data: a folder that is not there, and one without its labels, are said as such
        let gone = t.path().join("no-such-set");
        let mut real = parse(&["--data", &gone.display().to_string()]);
        let e = real.dataset_identity().unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        std::fs::create_dir_all(gone.join("images_training_rev1")).unwrap();
        let e = real.dataset_identity().unwrap_err().to_string();
        assert!(e.contains("it has no training_solutions_rev1.csv (it needs"), "{e}");
        // what the synth and prep stages leave
        let data = ctx.data_dir();
        std::fs::create_dir_all(data.join("images_training_rev1")).unwrap();
        std::fs::create_dir_all(data.join("images_test_rev1")).unwrap();
        for f in ["training_solutions_rev1.csv", "synth.json"] {
            std::fs::write(data.join(f), "x").unwrap();
        }
        let dataset = [Output::new("dataset", &data, KAGGLE_MEMBERS)];
        // a set stamped without the generator version (an xtask from before it, so an earlier
        // gz drew it) is not current: its synth stage runs again
        Stamp::save(
            &stamp_path(&ctx.root, "synth", &data),
            "synth",
            &synth_command(&ctx),
            &[],
            &dataset,
            "",
        )
        .unwrap();
        let e = ctx.dataset_identity().unwrap_err().to_string();
        assert!(
            e.contains("the `synth` stage is not up to date") && e.contains("inputs changed"),
            "{e}"
        );
        let synth_in = synth_inputs(&mut ctx).unwrap();
        Stamp::save(
            &stamp_path(&ctx.root, "synth", &data),
            "synth",
            &synth_command(&ctx),
            &synth_in,
            &dataset,
            "",
        )
        .unwrap();
        let cache = ctx.cache_root().join("c24");
        std::fs::create_dir_all(&cache).unwrap();
        let inputs = prep_inputs(&mut ctx).unwrap();
        let out = [Output::new("cache", &cache, &[])];
        Stamp::save(
            &stamp_path(&ctx.root, "prep", &data),
            "prep",
            &prep_command(&ctx),
            &inputs,
            &out,
            "",
        )
        .unwrap();
        assert_eq!(ctx.cache().unwrap(), cache);
        let e = parse(&["--seed", "7", "--size", "40"]).cache().unwrap_err().to_string();
        assert!(
            e.contains("the `prep` stage is not up to date")
                && e.contains("--size 40")
                && e.contains("cargo xtask prep"),
            "{e}"
        );
        let e = parse(&["--seed", "8", "--size", "24"]).cache().unwrap_err().to_string();
        assert!(
            e.contains("the `synth` stage is not up to date") && e.contains("--seed 8"),
            "{e}"
        );
    }

    /// `cargo xtask eval` or `submit` alone on a run trained with other options is refused,
    /// naming the train stage to run first (it scored the old run as up to date).
    #[test]
    fn a_later_stage_alone_refuses_a_run_of_other_options() {
        let t = tempfile::tempdir().unwrap();
        let parse = |extra: &[&str]| Ctx::parse(fake_gz_args(t.path(), extra)).unwrap();
        let ctx = parse(&["--epochs", "3"]);
        let (cache, run) = (t.path().join("cache"), ctx.run_dir());
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        for f in ["best.safetensors", "best.json", TRAIN_NOTE] {
            std::fs::write(run.join(f), "x").unwrap();
        }
        let inputs = train_inputs(&cache).unwrap();
        let out = [Output::new("run", &run, &["best.safetensors", "best.json"])];
        Stamp::save(
            &stamp_path(&ctx.root, "train", &run),
            "train",
            &stamped_command("train", vec![train_command(&ctx, &cache, &run)]),
            &inputs,
            &out,
            "",
        )
        .unwrap();
        assert_eq!(ctx.need_current_run(&cache).unwrap(), run);
        let e = parse(&["--epochs", "5"])
            .need_current_run(&cache)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the `train` stage is not up to date")
                && e.contains("--epochs 3 ")
                && e.contains("--epochs 5 ")
                && e.contains("cargo xtask train"),
            "{e}"
        );
    }

    /// A root that does not exist yet is resolved through its longest existing ancestor.
    #[cfg(unix)]
    #[test]
    fn a_root_is_resolved_through_what_exists() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().canonicalize().unwrap();
        std::fs::create_dir(real.join("a")).unwrap();
        std::os::unix::fs::symlink(real.join("a"), real.join("link")).unwrap();
        assert_eq!(resolved(&real.join("link/new/sub")), real.join("a/new/sub"));
        assert_eq!(resolved(&real.join("a/../link")), real.join("a"));
        assert_eq!(resolved(Path::new("/no/such/root")), Path::new("/no/such/root"));
    }

    /// The train stage's input is the cache's training split: two caches of the same training
    /// split with other test images, in other folders, are one input; another training split,
    /// or the same prepared otherwise, is another.
    #[test]
    fn the_train_input_is_the_training_split() {
        let t = tempfile::tempdir().unwrap();
        let manifest = |dir: &str, train_crc: u32, test_crc: u32, size: u32| {
            let cache = t.path().join(dir);
            std::fs::create_dir_all(&cache).unwrap();
            let split =
                |crc: u32| serde_json::json!({"rows": 4, "shards": [{"file": "x.shard", "rows": 4, "crc32": crc}]});
            let m = serde_json::json!({
                "format": "gz-shards", "version": 1, "config_hash": format!("h{size}"),
                "prep_config": {"crop": 212, "size": size},
                "splits": [["train", split(train_crc)], ["test", split(test_crc)]],
                "extra": {"data_dir": dir},
            });
            std::fs::write(cache.join("manifest.json"), m.to_string()).unwrap();
            train_inputs(&cache).unwrap()
        };
        let a = manifest("a", 1, 10, 32);
        assert_eq!(manifest("b", 1, 11, 32), a);
        assert_ne!(manifest("c", 2, 10, 32), a);
        assert_ne!(manifest("d", 1, 10, 64), a);
        // no manifest: the folder's identity
        assert!(train_inputs(&t.path().join("none")).unwrap()[0].1.contains("missing"));
    }

    /// A train stamp and run note an earlier xtask wrote (the cache's folder in the command,
    /// its identity as the input) are rewritten in today's form when current, so an upgrade
    /// keeps the run; a stale one is left to the stage (which retrains).
    #[test]
    fn an_earlier_xtasks_train_stamp_is_carried_over() {
        let t = tempfile::tempdir().unwrap();
        let ctx = Ctx::parse(fake_gz_args(t.path(), &["--epochs", "3"])).unwrap();
        let (cache, run) = (t.path().join("cache"), ctx.run_dir());
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::write(cache.join("manifest.json"), "{}").unwrap();
        std::fs::create_dir_all(&run).unwrap();
        for f in ["best.safetensors", "best.json"] {
            std::fs::write(run.join(f), "x").unwrap();
        }
        let cmd = train_command(&ctx, &cache, &run);
        let old_inputs = vec![("cache".to_string(), fingerprint::identity(&cache).unwrap())];
        let note = serde_json::json!({ "command": cmd, "inputs": old_inputs });
        std::fs::write(run.join(TRAIN_NOTE), note.to_string()).unwrap();
        let sp = stamp_path(&ctx.root, "train", &run);
        let out = [Output::new("run", &run, &["best.safetensors", "best.json"])];
        // (where and as an earlier xtask wrote it: named by the absolute path, no root marks)
        let scratch = t.path().join("scratch/data/stamps/s.json");
        let save_legacy = |root: &Path, key: &Path, cmd: &[String], out: &[Output], stdout: &str| {
            Stamp::save(&scratch, "train", cmd, &old_inputs, out, stdout).unwrap();
            let legacy = crate::stamp::legacy_stamp_path(root, "train", key);
            std::fs::create_dir_all(legacy.parent().unwrap()).unwrap();
            std::fs::copy(&scratch, legacy).unwrap();
        };
        save_legacy(&ctx.root, &run, &cmd, &out, "scores");
        assert!(!sp.exists());
        let (flat, inputs) = (
            stamped_command("train", vec![cmd.clone()]),
            train_inputs(&cache).unwrap(),
        );
        assert!(Stamp::find(&ctx.root, "train", &run)
            .unwrap()
            .stale_reason(&flat, &inputs)
            .unwrap()
            .is_some());
        migrate_train_stamp(&ctx, &cache, &run, &cmd, &inputs).unwrap();
        let s = Stamp::load(&sp).unwrap();
        assert_eq!(s.stale_reason(&flat, &inputs).unwrap(), None);
        assert_eq!(s.stdout, "scores");
        // the old one is gone (else every call carried it over again, under the root's lock)
        assert!(!crate::stamp::legacy_stamp_path(&ctx.root, "train", &run).exists());
        let note: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join(TRAIN_NOTE)).unwrap()).unwrap();
        let marked = crate::stamp::marked(&flat, &ctx.root);
        assert!(marked.contains(&"<root>/runs/synth-tiny".to_string()), "{marked:?}");
        assert_eq!(note, serde_json::json!({ "command": marked, "inputs": inputs }));

        // a stale old stamp (the run changed since) is not carried over
        std::fs::remove_file(&sp).unwrap();
        save_legacy(&ctx.root, &run, &cmd, &out, "");
        std::fs::write(run.join("best.json"), "changed").unwrap();
        migrate_train_stamp(&ctx, &cache, &run, &cmd, &inputs).unwrap();
        assert!(!sp.exists());

        // a root typed through a link, which an earlier xtask did not resolve: its stamp is
        // found under, and its command names, the linked spelling
        #[cfg(unix)]
        {
            let real = t.path().join("real");
            std::fs::create_dir_all(&real).unwrap();
            let link = t.path().join("link");
            std::os::unix::fs::symlink(&real, &link).unwrap();
            let ctx = Ctx::parse(fake_gz_args(&link, &["--epochs", "3"])).unwrap();
            assert_eq!(ctx.root, real.canonicalize().unwrap());
            let run = ctx.run_dir();
            let typed_run = link.join(run.strip_prefix(&ctx.root).unwrap());
            std::fs::create_dir_all(&run).unwrap();
            for f in ["best.safetensors", "best.json"] {
                std::fs::write(run.join(f), "x").unwrap();
            }
            let old_cmd = train_command(&ctx, &cache, &typed_run);
            let old_out = [Output::new("run", &typed_run, &["best.safetensors", "best.json"])];
            save_legacy(&link, &typed_run, &old_cmd, &old_out, "");
            let cmd = train_command(&ctx, &cache, &run);
            assert_ne!(cmd, old_cmd);
            migrate_train_stamp(&ctx, &cache, &run, &cmd, &inputs).unwrap();
            let s = Stamp::load(&stamp_path(&ctx.root, "train", &run)).expect("carried over");
            assert_eq!(
                s.stale_reason(&stamped_command("train", vec![cmd]), &inputs).unwrap(),
                None
            );
            assert_eq!(s.outputs[0].0.path, run);
        }
    }

    /// A dataset folder spelled in different ways is one dataset, named by its own name (`..`
    /// named the run `data-…`).
    #[test]
    fn a_dataset_spelled_differently_is_one_dataset() {
        let t = tempfile::tempdir().unwrap();
        let km = t.path().join("km");
        std::fs::create_dir_all(km.join("images_training_rev1")).unwrap();
        let ctx = |data: &Path| Ctx::parse(fake_gz_args(t.path(), &["--data", &data.display().to_string()])).unwrap();
        let plain = ctx(&km);
        for other in [
            km.join("images_training_rev1").join(".."),
            t.path().join(".").join("km"),
            PathBuf::from(format!("{}/", km.display())),
        ] {
            let c = ctx(&other);
            assert_eq!(c.data_dir(), plain.data_dir(), "{}", other.display());
            assert_eq!(c.run_dir(), plain.run_dir(), "{}", other.display());
        }
        assert!(
            plain.run_dir().ends_with("runs/km-tiny"),
            "{}",
            plain.run_dir().display()
        );
    }

    /// `--train`/`--test` (the synthetic set's size) with `--data DIR` are refused, not ignored.
    #[test]
    fn synthetic_sizes_clash_with_real_data() {
        let t = tempfile::tempdir().unwrap();
        for clash in [&["--data", "/d", "--train", "10"][..], &["--test=5", "--data", "/d"]] {
            let e = Ctx::parse(fake_gz_args(t.path(), clash)).err().unwrap().to_string();
            assert!(
                e.contains("--train/--test size the synthetic set, and --data /d"),
                "{clash:?}: {e}"
            );
        }
    }

    /// A run name that is not one plain folder (`..`, `.`, empty, a path) is refused before
    /// anything is deleted; plain names pass.
    #[test]
    fn run_names_stay_inside_runs() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().to_string_lossy().into_owned();
        let parse = |name: &str| {
            Ctx::parse(Args::new(vec![
                "--root".into(),
                root.clone(),
                "--gz".into(),
                "/bin/true".into(),
                "--name".into(),
                name.into(),
            ]))
        };
        for bad in ["..", ".", "", "../x", "a/b", "/tmp", ".hidden", "a\\b"] {
            let e = parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"))
                .to_string();
            assert!(
                e.contains("plain folder name") || (bad.is_empty() && e.contains("not an empty word")),
                "{bad:?}: {e}"
            );
        }
        for good in ["synth-tiny", "my_run.2", "r32+r32"] {
            let ctx = parse(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
            assert_eq!(ctx.run_dir(), t.path().join("runs").join(good));
        }
    }

    /// An interrupted training run of the same command and inputs is resumed; a finished one, or
    /// one of another command or other inputs, is replaced by a fresh run with a new note.
    #[test]
    fn interrupted_training_is_resumed_not_replaced() {
        let t = tempfile::tempdir().unwrap();
        let run = t.path().join("run");
        let cmd = vec!["train".to_string(), "--epochs".into(), "3".into()];
        let inputs = vec![("cache".to_string(), "abc".to_string())];
        let fresh = BeforeRun::Run(vec![]);
        // a best sidecar whose weights_crc32 is that of the weights file "w" written below
        let best = |epoch: u64| serde_json::json!({"epoch": epoch, "weights_crc32": crc32fast::hash(b"w")}).to_string();
        // fresh: the note is written first
        assert_eq!(train_before_run(&run, &cmd, &inputs, false).unwrap(), fresh);
        assert!(run.join(TRAIN_NOTE).exists());
        // killed before any epoch finished (no last.json): a fresh run again
        assert_eq!(train_before_run(&run, &cmd, &inputs, false).unwrap(), fresh);
        // killed after epoch 1 of 3: resumed, nothing removed; with --force: fresh
        let last = |epoch: u64| serde_json::json!({"epoch": epoch, "train": {"epochs": 3}}).to_string();
        std::fs::write(run.join("last.json"), last(1)).unwrap();
        let resume = BeforeRun::Run(vec!["--resume".into()]);
        assert_eq!(train_before_run(&run, &cmd, &inputs, false).unwrap(), resume);
        assert!(run.join("last.json").exists());
        assert_eq!(train_before_run(&run, &cmd, &inputs, true).unwrap(), fresh);
        assert!(!run.join("last.json").exists());
        // finished, killed before the stamp: kept as it is; with --force: fresh
        std::fs::write(run.join("last.json"), last(3)).unwrap();
        std::fs::write(run.join("best.json"), "{}").unwrap();
        // its best checkpoint missing: trained again
        assert_eq!(train_before_run(&run, &cmd, &inputs, false).unwrap(), fresh);
        std::fs::write(run.join("last.json"), last(3)).unwrap();
        std::fs::write(run.join("best.json"), best(3)).unwrap();
        std::fs::write(run.join("best.safetensors"), "w").unwrap();
        assert_eq!(train_before_run(&run, &cmd, &inputs, false).unwrap(), BeforeRun::Done);
        assert!(run.join("best.json").exists());
        // finished, but stopped (a full disk) between last.json, which counts its final epoch
        // as the best, and best.json, still an earlier epoch's: resumed (gz train writes that
        // best), not kept with the stale best nor trained again
        let ended = |best: u64| serde_json::json!({"epoch": 3, "best_epoch": best, "train": {"epochs": 3}}).to_string();
        std::fs::write(run.join("last.json"), ended(3)).unwrap();
        std::fs::write(run.join("best.json"), best(2)).unwrap();
        assert_eq!(train_before_run(&run, &cmd, &inputs, false).unwrap(), resume);
        assert!(run.join("best.json").exists());
        std::fs::write(run.join("best.json"), best(3)).unwrap();
        assert_eq!(train_before_run(&run, &cmd, &inputs, false).unwrap(), BeforeRun::Done);
        std::fs::write(run.join("last.json"), ended(2)).unwrap();
        std::fs::write(run.join("best.json"), best(2)).unwrap();
        assert_eq!(train_before_run(&run, &cmd, &inputs, false).unwrap(), BeforeRun::Done);
        // killed between best.json and the rename of its weights: they wait staged, the old
        // best.safetensors is another epoch's; resumed (gz train finishes the rename), not
        // put aside and trained again
        std::fs::write(run.join("best.safetensors"), "old").unwrap();
        std::fs::write(run.join("best.safetensors.new"), "w").unwrap();
        assert_eq!(train_before_run(&run, &cmd, &inputs, false).unwrap(), resume);
        assert!(run.join("best.json").exists());
        std::fs::remove_file(run.join("best.safetensors.new")).unwrap();
        std::fs::write(run.join("best.safetensors"), "w").unwrap();
        // its weights damaged (truncated, a flipped bit): not kept as finished (every eval
        // after failed on it) but trained again, the damaged run put aside meanwhile
        std::fs::write(run.join("best.safetensors"), "x").unwrap();
        assert_eq!(train_before_run(&run, &cmd, &inputs, false).unwrap(), fresh);
        assert!(!run.join("best.json").exists() && replaced_run(&run).join("best.json").exists());
        // the new run trained an epoch: the one put aside goes
        std::fs::write(run.join("last.json"), last(1)).unwrap();
        settle_replaced_run(&run, false).unwrap();
        assert!(!replaced_run(&run).exists() && run.join("last.json").exists());
        // a finished run, then a command gz refuses (nothing trained): the run comes back
        std::fs::write(run.join("last.json"), last(3)).unwrap();
        std::fs::write(run.join("best.json"), best(3)).unwrap();
        std::fs::write(run.join("best.safetensors"), "w").unwrap();
        let bogus = vec!["train".to_string(), "--bogus".into()];
        assert_eq!(train_before_run(&run, &bogus, &inputs, false).unwrap(), fresh);
        assert!(!run.join("best.json").exists());
        settle_replaced_run(&run, false).unwrap();
        assert!(
            run.join("best.json").exists() && run.join("best.safetensors").exists() && !replaced_run(&run).exists()
        );
        // (and the old command finds it finished again)
        assert_eq!(train_before_run(&run, &cmd, &inputs, false).unwrap(), BeforeRun::Done);
        // with --force: fresh, the finished run put aside until the new one succeeds
        assert_eq!(train_before_run(&run, &cmd, &inputs, true).unwrap(), fresh);
        assert!(!run.join("best.json").exists());
        settle_replaced_run(&run, true).unwrap();
        assert!(!replaced_run(&run).exists());
        // the same options in another order (`--train-arg --no-augment` moves xtask's own to
        // the end): the same run, resumed
        let w = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let note_before = std::fs::read(run.join(TRAIN_NOTE)).unwrap();
        let note = serde_json::json!({"command": w("train --epochs 3 --no-augment"), "inputs": [["cache", "abc"]]});
        std::fs::write(run.join(TRAIN_NOTE), note.to_string()).unwrap();
        std::fs::write(run.join("last.json"), last(1)).unwrap();
        let reordered = w("train --no-augment --epochs 3");
        assert_eq!(train_before_run(&run, &reordered, &inputs, false).unwrap(), resume);
        std::fs::write(run.join(TRAIN_NOTE), note_before).unwrap();
        // another command, or other inputs: replaced, saying what changed
        std::fs::write(run.join("last.json"), last(1)).unwrap();
        let other = vec!["train".to_string(), "--epochs".into(), "4".into()];
        let note: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join(TRAIN_NOTE)).unwrap()).unwrap();
        assert_eq!(note_change(&note, &other), " (--epochs 3 → 4)");
        assert_eq!(note_change(&note, &cmd), " (its inputs changed)");
        assert_eq!(train_before_run(&run, &other, &inputs, false).unwrap(), fresh);
        assert!(!run.join("last.json").exists());
        std::fs::write(run.join("last.json"), last(1)).unwrap();
        let moved = vec![("cache".to_string(), "xyz".to_string())];
        assert_eq!(train_before_run(&run, &other, &moved, false).unwrap(), fresh);
        assert!(!run.join("last.json").exists());
    }

    /// A stale run is replaced only when its folder holds nothing but what a run and xtask
    /// write: a user's notes, a subfolder, a dataset or a cache under the run's name are named
    /// and kept, with the run's own files (`remove_dir_all` took them all); so is a stale test
    /// report holding more than gz eval writes.
    #[test]
    fn a_stale_run_or_report_goes_only_with_nothing_else_in_it() {
        let t = tempfile::tempdir().unwrap();
        let run = t.path().join("run");
        let cmd = vec!["train".to_string()];
        let inputs = vec![("cache".to_string(), "abc".to_string())];
        // files (and the folders above them) under `dir`
        let put = |dir: &Path, names: &[&str]| {
            for n in names {
                let p = dir.join(n);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, "x").unwrap();
            }
        };
        let fill = |names: &[&str]| put(&run, names);
        let run_files = [
            "last.json",
            "last.safetensors",
            "last.optim.safetensors.new",
            "best.safetensors.tmp123",
            ".metrics.jsonl.77.tmp",
            "config.json",
            ".gz-train.lock",
            ".xtask-train.json",
        ];
        for extra in [
            &["notes.txt"][..],
            &["sub/keep.txt"],
            &["images_training_rev1/1.jpg"],
            &["train-00000.shard"],
        ] {
            fill(&run_files);
            fill(extra);
            let e = train_before_run(&run, &cmd, &inputs, true).unwrap_err().to_string();
            assert!(
                e.contains("that no training run wrote") && e.contains(extra[0].split('/').next().unwrap()),
                "{e}"
            );
            for n in run_files.iter().chain(extra) {
                assert!(run.join(n).exists(), "{n} kept");
            }
            std::fs::remove_dir_all(&run).unwrap();
        }
        fill(&run_files);
        assert_eq!(
            train_before_run(&run, &cmd, &inputs, true).unwrap(),
            BeforeRun::Run(vec![])
        );
        // what a folder holds, by name
        let names = |dir: &Path| -> Vec<std::ffi::OsString> {
            std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect()
        };
        assert_eq!(names(&run), [std::ffi::OsString::from(TRAIN_NOTE)], "only the new note");

        // a run folder that is a link (to another disk): emptied where it points, the link kept
        #[cfg(unix)]
        {
            let elsewhere = t.path().join("elsewhere");
            std::fs::create_dir(&elsewhere).unwrap();
            std::fs::remove_dir_all(&run).unwrap();
            std::os::unix::fs::symlink(&elsewhere, &run).unwrap();
            put(&elsewhere, &run_files);
            assert_eq!(
                train_before_run(&run, &cmd, &inputs, true).unwrap(),
                BeforeRun::Run(vec![])
            );
            assert_eq!(names(&elsewhere), [std::ffi::OsString::from(TRAIN_NOTE)]);
            assert!(std::fs::symlink_metadata(&run).unwrap().file_type().is_symlink());
        }

        let report = t.path().join("test");
        let write = |names: &[&str]| put(&report, names);
        let report_files = [
            "metrics.json",
            "index.html",
            "per_question.png",
            "gallery/7.png",
            "gallery/.gz-gallery",
            ".gz-eval.lock",
        ];
        write(&report_files);
        write(&["gallery/mine.txt"]);
        let e = clear_known(&report, is_report_file, "report").unwrap_err().to_string();
        assert!(e.contains("gallery/mine.txt"), "{e}");
        assert!(report.join("metrics.json").exists());
        std::fs::remove_file(report.join("gallery/mine.txt")).unwrap();
        clear_known(&report, is_report_file, "report").unwrap();
        assert!(!report.exists());
    }

    /// The words of a command line.
    fn words(v: &[&str]) -> Args {
        Args::new(v.iter().map(|s| s.to_string()).collect())
    }

    /// `--root ROOT --gz /bin/true` (a gz that is never run for real) and `extra`.
    fn fake_gz_args(root: &Path, extra: &[&str]) -> Args {
        let mut v = vec![
            "--root".to_string(),
            root.display().to_string(),
            "--gz".into(),
            "/bin/true".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        Args::new(v)
    }

    /// `cargo xtask prep --cache DIR` is refused by name (the cache was built under data/cache
    /// and --cache ignored); `--size` and `--prep-arg` beside `--cache` (which prep does not
    /// build) are refused too, and the pipeline with `--cache` does not run prep, whose cache
    /// would go unused: its first gz command is `gz train --cache DIR`.
    #[cfg(unix)]
    #[test]
    fn the_prep_stage_does_not_ignore_cache() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path().join("root").display().to_string();
        let cache = t.path().join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        // (its manifest makes it a cache)
        std::fs::write(cache.join("manifest.json"), "{}").unwrap();
        let c = cache.display().to_string();
        let e = format!(
            "{:#}",
            cmd_stage("prep", words(&["--root", &r, "--gz", "/bin/true", "--cache", &c])).unwrap_err()
        );
        assert!(
            e.contains(&format!("--cache {c} names a finished shard cache"))
                && e.contains("`cargo xtask prep` builds that stage's cache under"),
            "{e}"
        );
        for (extra, says) in [
            (&["--size", "40"][..], "--size sets how"),
            (&["--prep-arg", "--crop=180"], "--prep-arg sets how"),
            (
                &["--size=40", "--prep-arg", "--strict"],
                "--size and --prep-arg set how",
            ),
        ] {
            let mut v = vec!["--root", &r, "--gz", "/bin/true", "--cache", &c];
            v.extend(extra);
            let e = Ctx::parse(words(&v)).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("drop"), "{extra:?}: {e}");
        }
        assert!(Ctx::parse(words(&["--root", &r, "--gz", "/bin/true", "--cache", &c])).is_ok());

        // a stand-in gz that notes its command and fails; a (fake) Kaggle-layout dataset
        let _runs = crate::gz::tests::RUNS.lock().unwrap_or_else(|e| e.into_inner());
        let log = t.path().join("gz.log");
        let gz = crate::gz::tests::fake_gz(t.path(), &format!(" *) echo \"$*\" >> '{}'; exit 1;;", log.display()));
        let data = t.path().join("kaggle");
        for d in ["images_training_rev1", "images_test_rev1"] {
            std::fs::create_dir_all(data.join(d)).unwrap();
        }
        std::fs::write(data.join("training_solutions_rev1.csv"), "GalaxyID\n").unwrap();
        let (g, d) = (gz.display().to_string(), data.display().to_string());
        // no test JPEG: refused before any stage (the submit stage failed on it, last)
        let e = cmd_pipeline(words(&["--root", &r, "--gz", &g, "--data", &d, "--cache", &c])).unwrap_err();
        assert!(
            format!("{e:#}").contains("has no test JPEGs in images_test_rev1/"),
            "{e:#}"
        );
        assert!(!log.exists(), "gz ran");
        std::fs::write(data.join("images_test_rev1").join("1.jpg"), b"\xff\xd8").unwrap();
        let e = cmd_pipeline(words(&["--root", &r, "--gz", &g, "--data", &d, "--cache", &c])).unwrap_err();
        assert!(format!("{e:#}").contains("stage `train` failed"), "{e:#}");
        let ran = std::fs::read_to_string(&log).unwrap();
        assert!(ran.starts_with(&format!("train --cache {c} ")), "{ran}");
        // the failure repeats gz's error (and what follows it), not all its last lines: they
        // went by above as it ran
        std::fs::create_dir_all(t.path().join("noisy")).unwrap();
        let noisy = crate::gz::tests::fake_gz(
            &t.path().join("noisy"),
            " *) printf 'epoch 1\\nnote: a note\\nerror: boom\\n  because\\n' >&2; exit 1;;",
        );
        let n = noisy.display().to_string();
        let e = cmd_pipeline(words(&["--root", &r, "--gz", &n, "--data", &d, "--cache", &c])).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("error: boom\n  because") && !e.contains("note: a note") && !e.contains("epoch 1"),
            "{e}"
        );
    }

    /// A stage whose `before_run` refuses (a run folder holding a user's files, say) keeps its
    /// old stamp: the next call gives the same reason ("its command line changed"), not "it
    /// has not run yet" (the stamp was removed before the refusal).
    #[test]
    fn a_refused_before_run_keeps_the_stamp() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path().display().to_string();
        let mut ctx = Ctx::parse(words(&["--root", &r, "--gz", "/bin/true"])).unwrap();
        let key = t.path().join("runs").join("x");
        let sp = stamp_path(&ctx.root, "train", &key);
        let old = vec!["train".to_string(), "--epochs".into(), "3".into()];
        Stamp::save(&sp, "train", &old, &[], &[], "").unwrap();
        let new = vec![vec!["train".to_string(), "--epochs".into(), "5".into()]];
        let e = stage(
            &mut ctx,
            "train",
            &key,
            new,
            vec![],
            |_| bail!("refused: the folder holds notes.txt"),
            |_| Ok(vec![]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("refused"), "{e:#}");
        let kept = Stamp::load(&sp).expect("the old stamp is kept");
        assert_eq!(kept.command, old);
    }

    /// A command line that is refused leaves no folder behind: `--root` was created while the
    /// command line was read, before a typo, a clash or a stage's refusal was reported.
    #[test]
    fn a_refused_command_line_creates_no_folder() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("new root");
        let r = root.display().to_string();
        for bad in [
            &["--bogus"][..],
            &["--epochs", "x"],
            &["--name", ".."],
            &["--augment", "--no-augment"],
            &["--data", "/d", "--train", "3"],
            &["--cache", "/c", "--size", "40"],
        ] {
            let mut v = vec!["--root", &r, "--gz", "/bin/true"];
            v.extend(bad);
            assert!(Ctx::parse(words(&v)).is_err(), "{bad:?} accepted");
            assert!(!root.exists(), "{bad:?} created {r}");
        }
        for (stage, bad) in [
            ("synth", &["--data", "/d"][..]),
            ("prep", &["--cache", "/c"]),
            ("train", &[]),
            ("pipeline", &["--test", "0"]),
        ] {
            let mut v = vec!["--root", &r, "--gz", "/bin/true"];
            v.extend(bad);
            let e = if stage == "pipeline" {
                cmd_pipeline(words(&v))
            } else {
                cmd_stage(stage, words(&v))
            };
            assert!(e.is_err(), "{stage} {bad:?} accepted");
            assert!(!root.exists(), "{stage} {bad:?} created {r}");
        }
        assert!(Ctx::parse(words(&["--root", &r, "--gz", "/bin/true"])).is_ok());
    }

    /// A run folder with only one half of its best checkpoint (`best.safetensors` or
    /// `best.json`) is reported by xtask naming the missing file and the way out, before gz
    /// is run on it; with both it passes, with neither it is "no trained run".
    #[test]
    fn a_half_checkpoint_names_the_missing_file() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path().display().to_string();
        let ctx = Ctx::parse(words(&["--root", &r, "--gz", "/bin/true", "--name", "run"])).unwrap();
        let run = ctx.run_dir();
        let e = ctx.need_run().unwrap_err().to_string();
        assert!(e.contains("no trained run in"), "{e}");
        std::fs::create_dir_all(&run).unwrap();
        for (has, missing) in [("best.json", "best.safetensors"), ("best.safetensors", "best.json")] {
            std::fs::write(run.join(has), "x").unwrap();
            let e = ctx.need_run().unwrap_err().to_string();
            assert!(
                e.contains(&format!("has {has} but not {missing}"))
                    && e.contains(&format!("put {missing} back"))
                    && e.contains("cargo xtask train --force"),
                "{e}"
            );
            std::fs::remove_file(run.join(has)).unwrap();
        }
        std::fs::write(run.join("best.json"), "x").unwrap();
        std::fs::write(run.join("best.safetensors"), "x").unwrap();
        assert_eq!(ctx.need_run().unwrap(), run);
    }

    /// The synth stage replaces a stale or interrupted set through `gz synth --force`, which
    /// holds gz synth's lock: removing the folder itself deleted the files of a `gz synth` still
    /// writing there. A killed run's lock file alone is no content; anything else is refused.
    #[test]
    fn the_synth_stage_replaces_a_set_through_gz_synth() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("synth");
        assert_eq!(synth_before_run(&out).unwrap(), BeforeRun::Run(vec![]));
        std::fs::create_dir_all(out.join("images_training_rev1")).unwrap();
        std::fs::write(out.join("images_training_rev1/100001.jpg"), "x").unwrap();
        for mark in ["synth.in-progress", "synth.json"] {
            std::fs::write(out.join(mark), "x").unwrap();
            assert_eq!(synth_before_run(&out).unwrap(), BeforeRun::Run(vec!["--force".into()]));
            assert!(
                out.join("images_training_rev1/100001.jpg").exists(),
                "{mark}: removed by xtask"
            );
            std::fs::remove_file(out.join(mark)).unwrap();
        }
        let e = synth_before_run(&out).unwrap_err().to_string();
        assert!(e.contains("was not written by `gz synth`"), "{e}");
        std::fs::remove_dir_all(out.join("images_training_rev1")).unwrap();
        std::fs::write(out.join(".gz-synth.lock"), "4242\n").unwrap();
        assert_eq!(synth_before_run(&out).unwrap(), BeforeRun::Run(vec![]));
    }
}
