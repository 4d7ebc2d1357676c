//! `gz synth`: write a synthetic Galaxy Zoo dataset in the Kaggle layout (see `gz_synth`).
//!
//! Splits raw arguments from the validated [`gz_synth::SynthConfig`], guards the output directory
//! (a non-empty directory holding something else is only overwritten with `--force`; the same,
//! complete dataset is left alone), shows a progress bar on a terminal and prints a summary.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _};

/// Arguments of `gz synth`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of training images.
    #[arg(long, default_value_t = 2000)]
    pub train: usize,
    /// Number of test images.
    #[arg(long, default_value_t = 500)]
    pub test: usize,
    /// Seed of everything random.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fewest simulated volunteers per galaxy.
    #[arg(long, default_value_t = 25)]
    pub min_volunteers: u32,
    /// Most simulated volunteers per galaxy (at most 10000).
    #[arg(long, default_value_t = 60)]
    pub max_volunteers: u32,
    /// Worker threads (default: all cores). The output does not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Overwrite a directory holding another (or an incomplete) dataset, or regenerate the same one.
    #[arg(long)]
    pub force: bool,
}

/// What is in the output directory already.
enum Target {
    /// Missing or empty.
    Empty,
    /// A complete dataset with the same config.
    Same,
    /// Something else (another dataset, an interrupted run, unrelated files).
    Other(String),
    /// Kaggle-layout images or labels without gz synth's markers: a real download.
    Foreign,
}

fn inspect(dir: &Path, cfg: &gz_synth::SynthConfig) -> anyhow::Result<Target> {
    let mut entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Target::Empty),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    if entries.next().is_none() {
        return Ok(Target::Empty);
    }
    match gz_synth::existing_config(dir) {
        Ok(Some(old)) if old.same_dataset(cfg) => Ok(Target::Same),
        Ok(Some(old)) => Ok(Target::Other(format!(
            "a different synthetic dataset (train {}, test {}, seed {}, {}–{} volunteers per galaxy)",
            old.train, old.test, old.seed, old.min_volunteers, old.max_volunteers
        ))),
        Ok(None) if dir.join(gz_synth::IN_PROGRESS).exists() => Ok(Target::Other(
            "an incomplete synthetic dataset (no synth.json: an interrupted run?)".into(),
        )),
        // images or labels gz synth did not write (a real download): never replaced, --force or not
        Ok(None)
            if [gz_synth::TRAIN_DIR, gz_synth::TEST_DIR, gz_synth::TRAIN_CSV]
                .iter()
                .any(|p| dir.join(p).exists()) =>
        {
            Ok(Target::Foreign)
        }
        Ok(None) => Ok(Target::Other("files that are not a synthetic dataset".into())),
        Err(e) => Ok(Target::Other(format!("an unreadable marker ({e})"))),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = gz_synth::SynthConfig {
        train: args.train,
        test: args.test,
        seed: args.seed,
        min_volunteers: args.min_volunteers,
        max_volunteers: args.max_volunteers,
        threads: args.threads.unwrap_or(0),
    };
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    match inspect(&args.out, &cfg)? {
        Target::Empty => {}
        Target::Same if !args.force => {
            println!(
                "up to date: {} already holds this dataset (train {}, test {}, seed {}); --force regenerates it",
                args.out.display(),
                cfg.train,
                cfg.test,
                cfg.seed
            );
            println!("data: {}", args.out.display());
            return Ok(());
        }
        Target::Foreign => {
            bail!(
                "{} holds a Kaggle-layout dataset that gz synth did not write (a real download?): not replaced, even \
                 with --force; choose another --out, or move it away (a run of an older gz synth that was \
                 interrupted looks the same: delete it by hand)",
                args.out.display()
            );
        }
        Target::Other(what) if !args.force => {
            bail!(
                "{} is not empty: it holds {what}; choose another --out or pass --force to replace it",
                args.out.display()
            );
        }
        Target::Same | Target::Other(_) => {
            // --force: remove only what gz synth writes, never other files
            gz_synth::clean(&args.out).with_context(|| format!("cleaning {}", args.out.display()))?;
        }
    }

    let total = (cfg.train + cfg.test) as u64;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("synth [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let summary = gz_synth::generate(&args.out, &cfg, &|n| bar.inc(n))
        .with_context(|| format!("generating the synthetic dataset in {}", args.out.display()))?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let n = summary.n_train + summary.n_test;
    println!(
        "synthetic dataset: {} train + {} (seed {}) in {:.1} s ({:.0} images/s), {:.1} MB of JPEG",
        summary.n_train,
        super::count(summary.n_test, "test image"),
        cfg.seed,
        secs,
        n as f64 / secs.max(1e-9),
        summary.jpeg_bytes as f64 / 1e6
    );
    // an empty split has no floor to show (its RMSE over no rows is not 0)
    let floor = |rows: usize, rmse: f64| {
        if rows == 0 {
            "- (no images)".to_string()
        } else {
            format!("{rmse:.5}")
        }
    };
    if n > 0 {
        println!(
            "Bayes floor (RMSE observed vs expected fractions, {:.1} volunteers on average): train {}, test {}",
            summary.mean_volunteers,
            floor(summary.n_train, summary.train_rmse as f64),
            floor(summary.n_test, summary.test_rmse as f64)
        );
    }
    let d = args.out.display();
    println!("  images:   {d}/{}/, {d}/{}/", gz_synth::TRAIN_DIR, gz_synth::TEST_DIR);
    println!(
        "  labels:   {d}/{} (Kaggle), {d}/{}",
        gz_synth::TRAIN_CSV,
        gz_synth::TEST_CSV
    );
    println!(
        "  truth:    {d}/{}, {d}/{}",
        gz_synth::EXPECTED_TRAIN_CSV,
        gz_synth::EXPECTED_TEST_CSV
    );
    println!(
        "  floor:    {d}/{}; config: {d}/{}",
        gz_synth::FLOOR_JSON,
        gz_synth::SYNTH_JSON
    );
    println!("data: {d}");
    Ok(())
}
