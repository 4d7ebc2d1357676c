//! `gz synth`: write a synthetic Galaxy Zoo dataset in the Kaggle layout (see `gz_synth`).
//!
//! Splits raw arguments from the validated [`gz_synth::SynthConfig`], guards the output directory
//! (a non-empty directory holding something else is only overwritten with `--force`; the same,
//! complete dataset is left alone: its `synth.json` and every file it implies are there), shows a progress bar on a terminal and prints a summary.
//!
//! The output directory is locked ([`OutLock`], `.gz-synth.lock` held with `flock`) from before
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
    let _lock = OutLock::take(&out)?;
    match inspect(&out, &cfg)? {
        Target::Empty => {}
        Target::Same if !args.force => {
            // a run killed between writing synth.json and removing its in-progress mark left
            // the mark beside a whole set (synth.json matches; this run holds the folder)
            let mark = out.join(gz_synth::IN_PROGRESS);
            match std::fs::remove_file(&mark) {
                Ok(()) => eprintln!("removed {}, left by a run killed as it finished", mark.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", mark.display())),
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

/// `.gz-synth.lock` ([`gz_synth::LOCK_FILE`]) in the output folder, held with an exclusive
/// `flock` while this `gz synth` inspects, cleans and writes the folder. The file holds the
/// holder's process id, for the message of the run that is refused; it is removed when the lock
/// is dropped. A killed holder leaves the file, but its lock ends with it, so the file blocks
/// nobody. Where the file cannot be created (a read-only folder: this run cannot write there
/// either) or the file system has no locks, the run goes on without one.
#[cfg_attr(not(unix), allow(dead_code, reason = "never made where there is no flock"))]
struct OutLock {
    path: PathBuf,
    /// The open file the lock is held on (closing it releases the lock).
    _file: std::fs::File,
}

impl OutLock {
    /// Creates `dir` if missing and takes its lock, or fails naming `dir` and the process that
    /// holds it. `Ok(None)`: no lock could be had, and nothing says another run holds one.
    #[cfg(unix)]
    fn take(dir: &Path) -> anyhow::Result<Option<OutLock>> {
        use std::io::Write as _;
        use std::os::unix::fs::MetadataExt as _;
        use std::os::unix::io::AsRawFd as _;

        if dir.exists() && !dir.is_dir() {
            anyhow::bail!("--out {}: exists and is not a folder", dir.display());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(gz_synth::LOCK_FILE);
        for _ in 0..10 {
            let file = match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
            {
                Ok(f) => f,
                // a folder this process cannot write into: it cannot clash with another writer
                // (an "up to date" set still says so; writing fails with its own message)
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(libc::EROFS) => {
                    return Ok(None)
                }
                Err(e) => return Err(e).with_context(|| format!("creating the lock file {}", path.display())),
            };
            // SAFETY: flock(2) on a descriptor this function owns; no memory is passed.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::WouldBlock {
                    let pid = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|t| t.trim().parse::<u32>().ok());
                    let who = pid.map_or("another gz synth".to_string(), |p| {
                        format!("another gz synth (process {p})")
                    });
                    bail!(
                        "{} is in use: {who} is writing into it; wait for it to finish or choose another --out \
                         (--force does not override this: it would delete the files being written)",
                        dir.display()
                    );
                }
                // a file system without locks (some network shares): as before there was a lock
                eprintln!(
                    "gz synth: warning: cannot lock {} ({err}); going on unprotected from another gz synth writing \
                     into {} at the same time",
                    path.display(),
                    dir.display()
                );
                return Ok(None);
            }
            // the holder before this one removes the file as it finishes: a lock taken on the
            // removed file (opened just before) guards nothing, so open the name again
            let same = match (file.metadata(), std::fs::metadata(&path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if !same {
                continue;
            }
            let mut file = file;
            file.set_len(0)
                .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
                .with_context(|| format!("writing the lock file {}", path.display()))?;
            return Ok(Some(OutLock { path, _file: file }));
        }
        bail!(
            "could not lock {}: other gz synth runs keep starting and ending in {}",
            path.display(),
            dir.display()
        )
    }

    /// No `flock` here: the folder is created and nothing is locked.
    #[cfg(not(unix))]
    fn take(dir: &Path) -> anyhow::Result<Option<OutLock>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(None)
    }
}

impl Drop for OutLock {
    fn drop(&mut self) {
        // removed while still locked (the lock goes with the file handle, after this): a run
        // that opened the file just before gets the lock on a removed file, sees that the name
        // no longer leads to it and opens the name again; best effort
        let _ = std::fs::remove_file(&self.path);
    }
}
