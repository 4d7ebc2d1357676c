//! `gz synth`: write a synthetic Galaxy Zoo dataset in the Kaggle layout (see `gz_synth`).
//!
//! Splits raw arguments from the validated [`gz_synth::SynthConfig`], guards the output directory
//! (a non-empty directory holding something else is only overwritten with `--force`; the same,
//! complete dataset is left alone: its `synth.json` and every file it implies are there), shows a progress bar on a terminal and prints a summary.
//!
//! The output directory is locked (`.gz-synth.lock` held with `flock`, [`crate::lock`]) from before
//! it is inspected until the dataset is complete: a second `gz synth` into the same folder, with
//! `--force` or not, is refused naming the folder and the first one's process, instead of
//! removing or overwriting its files. The lock ends with the process, so a killed run's lock
//! file does not block the next run.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _};

/// Arguments of `gz synth`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output directory (created if missing).
    #[arg(long, required_unless_present = "generator_version")]
    pub out: Option<PathBuf>,
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
    /// Print the version of the generator this gz draws (written to synth.json: a set drawn by
    /// another version is another dataset) and exit.
    #[arg(long)]
    pub generator_version: bool,
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
    // the lock file this run holds is no content (nor is a killed run's, left behind)
    let lock = std::ffi::OsStr::new(gz_synth::LOCK_FILE);
    if entries.all(|e| e.is_ok_and(|e| e.file_name() == lock)) {
        return Ok(Target::Empty);
    }
    match gz_synth::existing_config(dir) {
        // the same set, unless files of it were deleted since (then it is not up to date)
        Ok(Some(old)) if old.same_dataset(cfg) => {
            let missing = gz_synth::missing_files(dir, cfg);
            match missing.first() {
                None => Ok(Target::Same),
                Some(first) => Ok(Target::Other(format!(
                    "this synthetic dataset with {} of its files missing ({}{})",
                    missing.len(),
                    first.strip_prefix(dir).unwrap_or(first).display(),
                    if missing.len() > 1 { ", …" } else { "" }
                ))),
            }
        }
        Ok(Some(old)) if old.generator != cfg.generator => Ok(Target::Other(format!(
            "a synthetic dataset drawn by {} gz (generator version {}; this one draws version {}, whose images \
             differ)",
            // a set of a higher version is a newer gz's (this build was checked out or kept after it)
            if old.generator < cfg.generator {
                "an earlier"
            } else {
                "a later"
            },
            old.generator,
            cfg.generator
        ))),
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
    if args.generator_version {
        println!("{}", gz_synth::GENERATOR);
        return Ok(());
    }
    let Some(out) = args.out.clone() else {
        bail!("--out DIR is needed: the folder to write the dataset into");
    };
    let cfg = gz_synth::SynthConfig {
        train: args.train,
        test: args.test,
        seed: args.seed,
        min_volunteers: args.min_volunteers,
        max_volunteers: args.max_volunteers,
        threads: args.threads.unwrap_or(0),
        generator: gz_synth::GENERATOR,
    };
    super::check_threads(args.threads)?;
    // a config that cannot be generated is refused before the folder is created or locked
    cfg.validate()?;
    // nor a dataset among another's images, or in a cache
    super::check_not_in_data("--out", &out)?;
    // held until the dataset is complete (dropped at the end of this function)
    if out.exists() && !out.is_dir() {
        bail!("--out {}: exists and is not a folder", out.display());
    }
    let _lock = crate::lock::FolderLock::take(
        &out,
        gz_synth::LOCK_FILE,
        &crate::lock::Holder {
            command: "gz synth",
            doing: "writing into it",
            instead: "choose another --out (--force does not override this: it would delete the files being written)",
        },
    )?;
    if let Some(lock) = &_lock {
        lock.remove_on_signal();
    }
    match inspect(&out, &cfg)? {
        Target::Empty => {}
        Target::Same if !args.force => {
            // a run killed between writing synth.json and removing its in-progress mark left
            // the mark beside a whole set (synth.json matches; this run holds the folder)
            // (only when it is there: on a read-only disk removing a missing file fails as
            // "Read-only file system", and an up-to-date set there was refused)
            let mark = out.join(gz_synth::IN_PROGRESS);
            if mark.symlink_metadata().is_ok() {
                match std::fs::remove_file(&mark) {
                    Ok(()) => eprintln!("removed {}, left by a run killed as it finished", mark.display()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).with_context(|| format!("removing {}", mark.display())),
                }
            }
            println!(
                "up to date: {} already holds this dataset (train {}, test {}, seed {}); --force regenerates it",
                out.display(),
                cfg.train,
                cfg.test,
                cfg.seed
            );
            println!("data: {}", out.display());
            return Ok(());
        }
        Target::Foreign => {
            bail!(
                "{} holds a Kaggle-layout dataset that gz synth did not write (a real download?): not replaced, even \
                 with --force; choose another --out, or move it away (a run of an older gz synth that was \
                 interrupted looks the same: delete it by hand)",
                out.display()
            );
        }
        Target::Other(what) if !args.force => {
            bail!(
                "{} is not empty: it holds {what}; choose another --out or pass --force to replace it",
                out.display()
            );
        }
        Target::Same | Target::Other(_) => {
            // --force: remove only what gz synth writes, never other files
            gz_synth::clean(&out).with_context(|| format!("cleaning {}", out.display()))?;
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
    let summary = gz_synth::generate(&out, &cfg, &|n| bar.inc(n))
        .with_context(|| format!("generating the synthetic dataset in {}", out.display()))?;
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
    let floor = |rmse: Option<f64>| match rmse {
        None => "- (no images)".to_string(),
        Some(r) => format!("{r:.5}"),
    };
    if n > 0 {
        println!(
            "Bayes floor (RMSE observed vs expected fractions, {:.1} volunteers on average): train {}, test {}",
            summary.mean_volunteers,
            floor(summary.train_rmse),
            floor(summary.test_rmse)
        );
    }
    let d = out.display();
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
