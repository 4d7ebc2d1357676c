//! `gz train`: train a model from a shard cache (or `--describe` a model).
//!
//! Raw flags ([`Args`]) are turned into a validated `gz_model::train::TrainConfig`; the
//! library does the work and reports progress through an observer, which this module turns
//! into an indicatif bar (hidden when stderr is not a terminal) and one line per epoch on
//! stdout. The run directory layout is documented in `gz_model::train`.

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{bail, Context};
use gz_model::config::ModelConfig;
use gz_model::optim::{OptimizerKind, Schedule};
use gz_model::train::{EpochMetrics, Precision, StartInfo, TrainConfig, TrainError, TrainObserver};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `gz train`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Shard cache directory (from `gz prep`).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Model: vgg16-blog, dieleman, tiny, small, dieleman-tiny (with --resume: the run's own).
    #[arg(long, required_unless_present = "resume")]
    model: Option<String>,
    /// Print the architecture and parameter count, then exit (no cache needed: the input is then
    /// 106 px, gz prep's default; with --cache, the cache's size).
    #[arg(long)]
    describe: bool,
    /// Output layer: sigmoid or tree (default: the model's own).
    #[arg(long)]
    output: Option<String>,
    /// Run directory to write (checkpoints, metrics.jsonl, config.json); missing folders are
    /// created.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Number of epochs.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Device: cpu, cuda, cuda:N (`gpu` is taken as cuda), or auto (CUDA 0 when built with CUDA and a GPU is present, else the CPU).
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// Minibatch size.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Learning rate (default: 1e-3 for rmsprop/adamw, 1e-4 with vgg16-blog and dieleman, 0.04
    /// for sgd-nesterov).
    // (a negative value is read as one, and refused by the config's check: it was "unexpected
    // argument '-1' found")
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// Optimizer: rmsprop, sgd-nesterov, adamw (`adam` is taken as adamw, `sgd` and `nesterov` as sgd-nesterov).
    #[arg(long, default_value = "rmsprop")]
    optimizer: String,
    /// Learning-rate schedule: constant, dieleman (×0.1 at ~70% and ~90% of the epochs), or
    /// step:E1,E2,... (×0.1 from each listed 0-based epoch). Default: dieleman for
    /// sgd-nesterov, constant otherwise.
    #[arg(long)]
    schedule: Option<String>,
    /// Precision: f32 or bf16 (bf16 on CUDA only).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Seed of weights, validation split, shuffles and augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fraction of the images held out for validation.
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    val_fraction: f64,
    /// Early stopping: epochs without a better validation RMSE (0 = never stop early). Default:
    /// 5 with a constant learning rate; never with a step schedule (`dieleman`, `step:…`, and
    /// sgd-nesterov's default), whose late drops give most of its gain.
    #[arg(long)]
    patience: Option<usize>,
    /// Real-time augmentation (default on).
    #[arg(long, overrides_with = "no_augment")]
    augment: bool,
    /// Turn augmentation off.
    #[arg(long, overrides_with = "augment")]
    no_augment: bool,
    /// Continue the run in --out from its last checkpoint. The options not given are the run's
    /// own (its model, batch, rate, seed, …, its epochs and its device); options given must
    /// match the run's, except --epochs, --patience and --device.
    #[arg(long)]
    resume: bool,
    /// Use only a seeded subset of this many images (train + validation) for quick runs.
    #[arg(long)]
    max_train: Option<usize>,
}

/// `--resume` continues the run with the learning-rate schedule it started with (its
/// milestones are epochs of that run). An explicit `--schedule` that means another schedule is
/// refused rather than ignored (`dieleman` means the run's own: its drops for the run's epoch
/// count); a step schedule set for another epoch count is kept, and said so: the notes
/// returned are printed when training starts, after every refusal the trainer may still make
/// (a note followed by "cannot resume" read as if the note were the reason). Without
/// `--patience` the run keeps its own (so a step-schedule run does not gain early stopping).
fn apply_resumed_settings(
    args: &Args,
    cfg: &mut gz_model::train::TrainConfig,
    prior: &gz_model::checkpoint::Sidecar,
) -> anyhow::Result<Vec<String>> {
    let mut notes = Vec::new();
    let was = &prior.train.schedule;
    if let Some(asked) = args.schedule.as_deref() {
        let meant = if asked == "dieleman" {
            Schedule::dieleman(prior.train.epochs)
        } else {
            cfg.schedule.clone()
        };
        if &meant != was {
            bail!(
                "--schedule {asked} differs from the run's {was}: a resumed run keeps its schedule (start a new run \
                 to change it)"
            );
        }
    }
    if let (true, Schedule::Step { milestones, .. }) = (prior.train.epochs != cfg.epochs, was) {
        let late: Vec<String> = milestones
            .iter()
            .filter(|&&m| m >= cfg.epochs)
            .map(ToString::to_string)
            .collect();
        let late = match late.len() {
            0 => String::new(),
            1 => format!("; its drop at epoch {} comes after the last", late[0]),
            _ => format!("; its drops at epochs {} come after the last", late.join(", ")),
        };
        notes.push(format!(
            "resuming with the run's schedule {was} (set for {}), now for {}{late}",
            super::count(prior.train.epochs, "epoch"),
            super::count(cfg.epochs, "epoch")
        ));
    }
    if args.patience.is_none() {
        cfg.patience = prior.train.patience;
    }
    Ok(notes)
}

/// The options of a `gz train` given on its command line (not defaults): `--resume` takes the
/// others from the run it continues.
#[derive(Debug, Default, Clone)]
pub struct Given(Vec<String>);

impl Given {
    /// The ids of the options `m` (the subcommand's matches) got from the command line.
    pub fn of(m: &clap::ArgMatches) -> Self {
        Given(
            m.ids()
                .filter(|id| m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine))
                // (clap's derive also lists the struct's own argument group, `Args`: the
                // options are its snake_case fields)
                .filter(|id| !id.as_str().starts_with(|c: char| c.is_ascii_uppercase()))
                .map(|id| id.as_str().to_string())
                .collect(),
        )
    }

    fn has(&self, id: &str) -> bool {
        self.0.iter().any(|g| g == id)
    }

    /// `--describe` prints a model and trains nothing: it uses `--model`, `--output` and
    /// `--cache` (the input size), or without `--model` a run's own model (`--resume --out
    /// RUN`). Any other option given would be ignored in silence (and `--model` with `--resume`
    /// names two models), so it is refused, naming them.
    fn refuse_for_describe(&self, model_given: bool) -> anyhow::Result<()> {
        let mut used = vec!["describe", "model", "output", "cache"];
        if !model_given {
            used.extend(["resume", "out"]);
        }
        let ignored: Vec<String> = self
            .0
            .iter()
            .filter(|id| !used.contains(&id.as_str()))
            .map(|id| format!("--{}", id.replace('_', "-")))
            .collect();
        if ignored.is_empty() {
            return Ok(());
        }
        let which = if model_given && (self.has("resume") || self.has("out")) {
            " (with --model it describes that model; for a run's own, give --resume --out RUN \
             without --model)"
        } else {
            ""
        };
        bail!(
            "--describe only prints a model (from --model, --output and --cache, or a run's own \
             with --resume --out); it does not use {}{which}",
            ignored.join(", ")
        )
    }
}

/// With `--resume` and no `--device`, the device the run trained on (its config's), so a CUDA
/// run resumes on CUDA (in bf16 it cannot do otherwise); set before `main` decides where the
/// run's threads go. Nothing changes when the run cannot be read (the trainer says why).
pub fn take_run_device(args: &mut Args, given: &Given) {
    if !args.resume || given.has("device") {
        return;
    }
    if let Some(prior) = args
        .out
        .as_deref()
        .and_then(|out| gz_model::train::resumable_run(out).ok())
    {
        args.device = prior.train.device;
    }
}

/// `args` with the options not `given` set to the run's own values (`prior`, its config):
/// what the user would have typed to repeat the run. `--device` is [`take_run_device`]'s,
/// `--patience` and `--schedule` are [`apply_resumed_settings`]'s.
fn with_run_values(args: &Args, given: &Given, prior: &TrainConfig) -> Args {
    let mut a = args.clone();
    if !given.has("model") {
        a.model = Some(prior.model.arch.name().to_string());
    }
    if !given.has("output") {
        a.output = Some(prior.model.output.name().to_string());
    }
    if !given.has("epochs") {
        a.epochs = prior.epochs;
    }
    if !given.has("batch") {
        a.batch = prior.batch;
    }
    if !given.has("lr") {
        a.lr = Some(prior.lr);
    }
    if !given.has("optimizer") {
        a.optimizer = prior.optimizer.name().to_string();
    }
    if !given.has("precision") {
        a.precision = match prior.precision {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
        .to_string();
    }
    if !given.has("seed") {
        a.seed = prior.seed;
    }
    if !given.has("val_fraction") {
        a.val_fraction = prior.val_fraction;
    }
    if !given.has("augment") && !given.has("no_augment") {
        a.augment = prior.augment.enabled;
        a.no_augment = !prior.augment.enabled;
    }
    if !given.has("max_train") {
        a.max_train = prior.max_images;
    }
    a
}

pub fn run(args: Args, given: &Given) -> anyhow::Result<()> {
    if args.describe {
        given.refuse_for_describe(args.model.is_some())?;
        // (`--describe --resume --out RUN`: the run's own model, as --resume takes it)
        let model = match (args.model.as_deref(), args.resume, args.out.as_deref()) {
            (Some(name), ..) => model_config(name, args.output.as_deref())?,
            (None, true, Some(out)) => {
                gz_model::train::resumable_run(out)
                    .with_context(|| format!("describing the model of {}", out.display()))?
                    .train
                    .model
            }
            _ => bail!("--describe needs --model (or --resume with --out, for the run's own)"),
        };
        // with --cache, the model as it would train on that cache (its image side)
        let model = match &args.cache {
            Some(dir) => {
                let cache = super::open_cache(dir)?;
                let split = cache.train().or(cache.test()).context("the cache holds no images")?;
                let cfg = gz_model::train::TrainConfig::new(model);
                gz_model::train::resolve_for_cache(&cfg, split.shape(), cache.prep_config()).model
            }
            None => model,
        };
        model.validate()?;
        print!("{}", gz_model::nets::describe_config(&model));
        return Ok(());
    }
    let cache_dir = args.cache.clone().with_context(|| {
        if args.resume {
            "--cache DIR is required: the cache the run was trained on"
        } else {
            "--cache DIR is required (or use --describe)"
        }
    })?;
    let out = args.out.clone().context("--out RUN_DIR is required")?;
    super::check_output("--out", &out, true)?;
    // (a run inside the cache it reads: `gz cache` would keep the cache for it, a muddle)
    super::check_not_an_input("--out", &out, &[], &[&cache_dir], None)?;
    super::check_writable("--out", &out, true)?;
    // a resumed run's own options for those not given (what is wrong with the run, the
    // trainer's refusal, before anything else is read)
    // (read once: its options, its schedule and patience, and how it had ended)
    let prior = if args.resume {
        Some(gz_model::train::resumable_run(&out).with_context(|| format!("resuming {}", out.display()))?)
    } else {
        None
    };
    let args = match &prior {
        Some(p) => with_run_values(&args, given, &p.train),
        None => args,
    };
    let name = args.model.as_deref().context("--model is required")?;
    let model = model_config(name, args.output.as_deref())?;
    let mut cfg = train_config(&args, model)?;
    let mut notes = match &prior {
        Some(p) => apply_resumed_settings(&args, &mut cfg, p)?,
        None => Vec::new(),
    };
    if !args.resume
        && cfg.model.output == gz_model::config::OutputKind::Tree
        && cfg.optimizer == OptimizerKind::SgdNesterov
    {
        // a known weakness, said where it bites (docs/benchmarks.md, "The tree head's dead answers")
        notes.push(
            "the tree head with sgd-nesterov has been seen to lose rare answers for good in the first epoch (pushed \
             below zero for every galaxy, they get no gradient through the tree's ReLU); rmsprop and adamw have not"
                .into(),
        );
    }

    let cache = super::open_cache(&cache_dir)?;
    let n_train = cache.train().map_or(0, |t| t.len());
    if let Some(m) = cfg.max_images.filter(|&m| m >= n_train && n_train > 0) {
        // every image is used: the same run as without the option (so a run started one way
        // resumes the other), and said, not capped in silence
        eprintln!("note: --max-train {m} is not below the cache's {n_train} training images: all of them are used");
        cfg.max_images = None;
    }
    let observer = CliObserver {
        notes,
        val_fraction: cfg.val_fraction,
        ..CliObserver::default()
    };
    crate::interrupt::install();
    let result = gz_model::train::train(&cfg, &cache, &out, args.resume, &observer);
    observer.finish();
    let summary = match result {
        Err(TrainError::Interrupted { at, epochs_done, kept }) => {
            eprintln!("gz train: stopped {at}; {kept}");
            if epochs_done > 0 {
                // (`gz train` by name: under `cargo xtask`, whose own line follows, "the same
                // command" read as the xtask command, which takes no --resume)
                // (the run's own options are taken for those not given)
                eprintln!(
                    "to continue: `gz train --cache {} --out {} --resume` (it keeps the run's options)",
                    super::shell_path(&cache_dir),
                    super::shell_path(&out)
                );
            } else {
                eprintln!("to continue: `gz train` with the same options (there is nothing to resume)");
            }
            // 128 + the signal, as a shell reports a process the signal ended
            let sig = crate::interrupt::requested().unwrap_or(libc::SIGINT);
            return Err(crate::ExitCode(128 + sig).into());
        }
        r => r.with_context(|| format!("training {name} into {}", out.display()))?,
    };

    let start_epoch = observer.start_epoch.lock().map_or(0, |e| *e);
    if let (true, Some(patience)) = (summary.stopped_early && summary.epochs_run == start_epoch, cfg.patience) {
        // a resumed run that had stopped early stops again before its first step: say so,
        // rather than "done"
        let since = summary.epochs_run.saturating_sub(summary.best_epoch);
        // stopped by its own patience before, or only by the one given now (a run that had
        // finished its epochs, resumed with more and a patience it already exceeds)
        let had_stopped = prior
            .as_ref()
            .is_some_and(|p| p.train.patience == Some(patience) && p.epoch < p.train.epochs);
        let ended = if had_stopped {
            format!(
                "the run had already ended by early stopping at epoch {}",
                summary.epochs_run
            )
        } else {
            format!(
                "--patience {patience} ends the run at once, at epoch {}",
                summary.epochs_run
            )
        };
        println!(
            "nothing trained: {ended} (no better validation RMSE in the {} after epoch {}, --patience \
             {patience}); best val RMSE {:.5} at epoch {} vs {:.5} predicting the training mean ({})",
            super::count(since, "epoch"),
            summary.best_epoch,
            summary.best_val_rmse,
            summary.best_epoch,
            summary.baseline_val_rmse,
            vs_mean(summary.best_val_rmse, summary.baseline_val_rmse),
        );
        eprintln!(
            "to train on: `gz train --cache {} --out {} --resume --patience {}` or more (0 never stops early)",
            super::shell_path(&cache_dir),
            super::shell_path(&out),
            since + 1
        );
        println!("run: {}", out.display());
        return Ok(());
    }

    println!(
        "done: {}{}, best val RMSE {:.5} at epoch {} vs {:.5} predicting the training mean ({})",
        super::count(summary.epochs_run, "epoch"),
        if summary.stopped_early { " (early stop)" } else { "" },
        summary.best_val_rmse,
        summary.best_epoch,
        summary.baseline_val_rmse,
        vs_mean(summary.best_val_rmse, summary.baseline_val_rmse),
    );
    println!("run: {}", out.display());
    Ok(())
}

/// The best validation RMSE against predicting the training mean, in words: `35.3% better`, or
/// `17.4% worse: …` with what may help (a signed `+17.4%` was easy to read as a gain).
fn vs_mean(best: f64, mean: f64) -> String {
    let change = 100.0 * (best / mean - 1.0);
    if format!("{change:.1}").trim_start_matches('-') == "0.0" || !change.is_finite() {
        "no better: the model has not learnt more than the mean; more epochs, a lower --lr or more data may help"
            .to_string()
    } else if change < 0.0 {
        format!("{:.1}% better", -change)
    } else {
        format!(
            "{change:.1}% worse: the model has not learnt more than the mean; more epochs, a lower --lr or more data \
             may help"
        )
    }
}

/// Early stopping's default patience with a constant learning rate.
const DEFAULT_PATIENCE: usize = 5;

/// Parses the model name and optional output kind into a `ModelConfig`.
pub fn model_config(name: &str, output: Option<&str>) -> anyhow::Result<ModelConfig> {
    let cfg = match output {
        None => ModelConfig::from_name_default_output(name)?,
        Some(o) => ModelConfig::from_name(name, o.parse().with_context(|| format!("--output {o:?}"))?)?,
    };
    Ok(cfg)
}

fn train_config(args: &Args, model: ModelConfig) -> anyhow::Result<TrainConfig> {
    let mut cfg = TrainConfig::new(model);
    cfg.optimizer = OptimizerKind::from_name(&args.optimizer).with_context(|| {
        format!(
            "unknown --optimizer {:?}: expected rmsprop, sgd-nesterov or adamw",
            args.optimizer
        )
    })?;
    cfg.lr = args.lr.unwrap_or(cfg.optimizer.default_lr_for(cfg.model.arch));
    cfg.schedule = match args.schedule.as_deref() {
        None if cfg.optimizer == OptimizerKind::SgdNesterov => Schedule::dieleman(args.epochs),
        None | Some("constant") => Schedule::Constant,
        Some("dieleman") => Schedule::dieleman(args.epochs),
        Some(s) if s.starts_with("step:") => {
            let milestones = s[5..]
                .split(',')
                .map(|e| e.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("--schedule {s:?}: expected step:E1,E2,... with epoch numbers"))?;
            // (a resumed run keeps its own schedule, set for its own epochs: compared with it,
            // not with --epochs, by apply_resumed_settings)
            if milestones.windows(2).any(|w| w[0] >= w[1])
                || (!args.resume && milestones.last().is_some_and(|&m| m >= args.epochs))
            {
                bail!(
                    "--schedule {s:?}: the epochs must increase and lie before --epochs {} (each multiplies the rate \
                     by 0.1 from that 0-based epoch on)",
                    args.epochs
                );
            }
            Schedule::Step { milestones, gamma: 0.1 }
        }
        Some(s) => bail!("unknown --schedule {s:?}: expected constant, dieleman or step:E1,E2,..."),
    };
    cfg.batch = args.batch;
    cfg.epochs = args.epochs;
    cfg.seed = args.seed;
    cfg.val_fraction = args.val_fraction;
    // the validation RMSE is bumpy at the full rate: 5 epochs without progress stopped every
    // scheduled run of the CPU recipe study before its first drop (docs/benchmarks.md)
    let patience = args.patience.unwrap_or(match cfg.schedule {
        Schedule::Constant => DEFAULT_PATIENCE,
        Schedule::Step { .. } => 0,
    });
    cfg.patience = (patience > 0).then_some(patience);
    cfg.augment.enabled = !args.no_augment;
    cfg.precision = Precision::from_name(&args.precision)
        .with_context(|| format!("unknown --precision {:?}: expected f32 or bf16", args.precision))?;
    cfg.device = args.device.clone();
    cfg.max_images = args.max_train;
    cfg.validate()?;
    Ok(cfg)
}

/// Draws a progress bar per epoch and prints one line per epoch.
#[derive(Default)]
struct CliObserver {
    bar: Mutex<Option<ProgressBar>>,
    epochs: Mutex<usize>,
    /// Printed (as `note: …` on stderr) when training starts.
    notes: Vec<String>,
    /// The epoch the run started after (0 unless resumed).
    start_epoch: Mutex<usize>,
    /// `--val-fraction`, to say the hold-out's real share when rounding changed it.
    val_fraction: f64,
}

impl CliObserver {
    fn finish(&self) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some(bar) = b.take() {
                bar.finish_and_clear();
            }
        }
    }
}

/// Below this many validation images `gz train` warns that the validation score means little
/// (its standard error is then several times the gaps between the models one compares).
const MIN_MEANINGFUL_VAL: usize = 50;

impl TrainObserver for CliObserver {
    fn on_start(&self, info: &StartInfo) {
        for note in &self.notes {
            eprintln!("note: {note}");
        }
        if let Ok(mut e) = self.start_epoch.lock() {
            *e = info.start_epoch;
        }
        println!(
            "training on {}, validating on {} ({}/epoch, {} parameters, device {}{}{}); \
             predicting the training mean gives val RMSE {:.5}",
            super::count(info.n_train, "image"),
            info.n_val,
            super::count(info.steps_per_epoch, "step"),
            info.param_count,
            info.device,
            if info.resident {
                ", data resident on the device"
            } else {
                ""
            },
            if info.batch_parts > 1 {
                format!(", each batch in {} parts side by side", info.batch_parts)
            } else {
                String::new()
            },
            info.baseline_val_rmse
        );
        if info.n_val < MIN_MEANINGFUL_VAL {
            eprintln!(
                "warning: the validation hold-out has only {}: its RMSE, the best epoch and early stopping rest on \
                 {} and mean little (at least {MIN_MEANINGFUL_VAL} are needed for a score to tell models apart; more \
                 training data or --val-fraction)",
                super::eval::holdout_size(info.n_val, info.n_train + info.n_val, self.val_fraction),
                if info.n_val == 1 { "it" } else { "them" }
            );
        }
        if info.start_epoch > 0 {
            println!("resuming after epoch {}", info.start_epoch);
        }
        if let Ok(mut e) = self.epochs.lock() {
            *e = info.epochs;
        }
        let bar = ProgressBar::new(info.steps_per_epoch as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        if let Ok(mut b) = self.bar.lock() {
            *b = Some(bar);
        }
    }

    fn on_step(&self, epoch: usize, step: usize, _steps: usize, loss: Option<f64>) {
        if let Ok(b) = self.bar.lock() {
            if let Some(bar) = b.as_ref() {
                if step == 1 {
                    bar.reset();
                    let total = self.epochs.lock().map(|e| *e).unwrap_or(0);
                    bar.set_prefix(format!("epoch {}/{}", epoch + 1, total));
                }
                bar.set_position(step as u64);
                if let Some(l) = loss {
                    bar.set_message(format!("loss {l:.5}"));
                }
            }
        }
    }

    fn on_validate(&self, _epoch: usize) {
        if let Ok(b) = self.bar.lock() {
            if let Some(bar) = b.as_ref() {
                bar.set_message("validating");
            }
        }
    }

    fn stop_requested(&self) -> bool {
        crate::interrupt::requested().is_some()
    }

    fn on_epoch(&self, m: &EpochMetrics) {
        let line = format!(
            "epoch {:>3}  train_loss {:.6}  val_rmse {:.5}{}  lr {:.2e}  {:.1} img/s  {:.1} s",
            m.epoch,
            m.train_loss,
            m.val_rmse,
            if m.best { " *" } else { "  " },
            m.lr,
            m.images_per_s,
            m.elapsed_s
        );
        match self.bar.lock().ok().and_then(|b| b.clone()) {
            Some(bar) => bar.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn patience(extra: &[&str]) -> Option<usize> {
        let cli = Cli::parse_from(["gz-train", "--model", "tiny"].iter().chain(extra));
        let model = model_config(cli.args.model.as_deref().unwrap(), None).unwrap();
        train_config(&cli.args, model).unwrap().patience
    }

    /// A step schedule's epochs must lie before --epochs in a new run; a resumed run keeps its
    /// own schedule, set for its own epochs, so there it is compared with the run's instead
    /// (it was refused when given, and accepted when left out).
    #[test]
    fn a_resumed_runs_schedule_is_not_held_to_the_new_epochs() {
        let cfg = |extra: &[&str]| {
            let cli = Cli::try_parse_from(["gz-train", "--model", "tiny"].iter().chain(extra)).unwrap();
            train_config(&cli.args, model_config("tiny", None).unwrap())
        };
        let e = format!("{:#}", cfg(&["--epochs", "3", "--schedule", "step:4"]).unwrap_err());
        assert!(e.contains("lie before --epochs 3"), "{e}");
        let c = cfg(&["--epochs", "3", "--schedule", "step:4", "--resume"]).unwrap();
        assert_eq!(
            c.schedule,
            Schedule::Step {
                milestones: vec![4],
                gamma: 0.1
            }
        );
        assert!(cfg(&["--epochs", "9", "--schedule", "step:4,2", "--resume"]).is_err());
    }

    /// A negative rate or fraction is read as a number and refused as out of range (clap took
    /// `-0.1` for an option: "unexpected argument '-0' found").
    #[test]
    fn negative_numbers_are_values_refused_by_range() {
        let err = |extra: &[&str]| {
            let cli = Cli::try_parse_from(["gz-train", "--model", "tiny"].iter().chain(extra))
                .unwrap_or_else(|e| panic!("{extra:?}: {e}"));
            let model = model_config(cli.args.model.as_deref().unwrap(), None).unwrap();
            format!("{:#}", train_config(&cli.args, model).unwrap_err())
        };
        let e = err(&["--val-fraction", "-0.1"]);
        assert!(
            e.contains("validation fraction -0.1 must be more than 0 and less than 1"),
            "{e}"
        );
        // the ends: 0 says why a run needs a validation split, 1 is out of range (the message
        // said "[0, 1)" and then refused 0)
        let e = err(&["--val-fraction", "0"]);
        assert!(e.contains("validation fraction 0: early stopping"), "{e}");
        let e = err(&["--val-fraction", "1"]);
        assert!(
            e.contains("validation fraction 1 must be more than 0 and less than 1"),
            "{e}"
        );
        let e = err(&["--lr", "-1"]);
        assert!(e.contains("learning rate -1 must be a positive number"), "{e}");
    }

    /// Worse than the training mean is said in words, with what may help (it was "(+17.4%)").
    #[test]
    fn the_baseline_comparison_is_in_words() {
        assert_eq!(vs_mean(0.10877, 0.16810), "35.3% better");
        let worse = vs_mean(0.19735, 0.16810);
        assert!(
            worse.starts_with("17.4% worse: the model has not learnt more than the mean;") && worse.contains("--lr"),
            "{worse}"
        );
        assert!(vs_mean(0.16810, 0.16810).starts_with("no better: "));
    }

    /// Early stopping defaults to 5 epochs at a constant rate and off with a step schedule
    /// (it stopped scheduled runs before their drops); an explicit `--patience` always wins.
    #[test]
    fn patience_defaults_to_off_with_a_step_schedule() {
        assert_eq!(patience(&[]), Some(5));
        assert_eq!(patience(&["--schedule", "constant"]), Some(5));
        assert_eq!(patience(&["--schedule", "dieleman"]), None);
        assert_eq!(patience(&["--schedule", "step:3,6"]), None);
        assert_eq!(patience(&["--optimizer", "sgd-nesterov"]), None);
        assert_eq!(patience(&["--schedule", "dieleman", "--patience", "4"]), Some(4));
        assert_eq!(patience(&["--patience", "0"]), None);
    }
}
