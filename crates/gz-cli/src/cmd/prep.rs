//! `gz prep`: preprocess a Kaggle-layout dataset into a shard cache (gz-preprocess), or re-check
//! an existing cache's checksums (`--verify`).
//!
//! Prints one line per skipped input (path: reason) and a summary, then `cache: <path>` as the
//! last stdout line. Exits 2 when any input was skipped (the cache is still written and valid,
//! holding the good images), 1 on errors. The default cache root is `<DIR>/../cache`, so
//! `data/kaggle` caches into `data/cache/<dataset-key>-<config-hash>/`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use gz_preprocess::{Filter, PrepConfig, RunOptions};

/// Arguments of `gz prep`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Kaggle-layout dataset directory (training_solutions_rev1.csv, images_training_rev1/,
    /// images_test_rev1/).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Cache root [default: <DATA>/../cache]. With --verify and no --data: the cache directory
    /// itself (the one holding manifest.json).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Centre crop side, in pixels of a 424×424 image.
    #[arg(long, default_value_t = 212)]
    crop: u32,
    /// Output side.
    #[arg(long, default_value_t = 106)]
    size: u32,
    /// Downsampling filter: area (box average; DCT-domain fast path) or bicubic.
    #[arg(long, default_value = "area", value_parser = parse_filter)]
    filter: Filter,
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Stop at the first bad input instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// Re-check every checksum of the cache (after preparing it, or of --cache alone).
    #[arg(long)]
    verify: bool,
    /// Images per shard file [default: 4096].
    #[arg(long)]
    rows_per_shard: Option<usize>,
}

// (the help above names the default; optional, so that a note can tell an option given)
const _: () = assert!(
    gz_shards::DEFAULT_ROWS_PER_SHARD == 4096,
    "update --rows-per-shard's help"
);

fn parse_filter(s: &str) -> Result<Filter, String> {
    match s {
        "area" | "box" => Ok(Filter::Area),
        "bicubic" => Ok(Filter::Bicubic),
        _ => Err(format!("unknown filter {s:?} (area, bicubic)")),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    super::check_threads(args.threads)?;
    let Some(data) = args.data.clone() else {
        if args.verify {
            let dir = args
                .cache
                .as_ref()
                .context("--verify without --data needs --cache <cache dir>")?;
            verify(dir)?;
            println!("cache: {}", dir.display());
            return Ok(());
        }
        anyhow::bail!("--data DIR is required (or --verify --cache CACHE_DIR)");
    };
    if data.join(gz_synth::IN_PROGRESS).is_file() && !data.join(gz_synth::SYNTH_JSON).is_file() {
        // its images and labels may be partial: a cache of them would pass for the dataset
        anyhow::bail!(
            "{} is a synthetic dataset gz synth did not finish ({} is there, {} is not): run the same `gz synth` \
             again (with --force) before preparing it",
            data.display(),
            gz_synth::IN_PROGRESS,
            gz_synth::SYNTH_JSON
        );
    }
    let cache_root = match &args.cache {
        Some(c) => c.clone(),
        None => default_cache_root(&data)?,
    };
    // a default root the user never named is said to be one, with the way to choose another
    // (a dataset on a read-only disk cannot take its cache beside it)
    let default_hint = if args.cache.is_none() {
        format!(
            "; {} is the default cache root, beside the dataset folder: --cache DIR writes the cache elsewhere",
            cache_root.display()
        )
    } else {
        String::new()
    };
    if cache_root.exists() && !cache_root.is_dir() {
        anyhow::bail!(
            "cache root {}: exists and is not a folder (--cache names the folder caches are written in){default_hint}",
            cache_root.display()
        );
    }
    // not among the images it reads: a cache there is a folder the next build skips as an
    // unreadable input (and a cache hit says nothing of it)
    if let Some(images) = images_folder_holding(&data, &cache_root) {
        anyhow::bail!(
            "cache root {} lies inside the dataset's image folder {}: write the caches elsewhere (--cache DIR; \
             by default they go beside the dataset folder)",
            cache_root.display(),
            images.display()
        );
    }
    let cfg = PrepConfig {
        crop: args.crop,
        size: args.size,
        filter: args.filter,
    };
    let mut opts = RunOptions::new(&data, &cache_root);
    opts.threads = args.threads;
    opts.strict = args.strict;
    opts.rows_per_shard = args.rows_per_shard.unwrap_or(gz_shards::DEFAULT_ROWS_PER_SHARD);
    // Ctrl-C or SIGTERM while decoding: stop after the chunk being decoded, the unfinished
    // cache removed (outside the decoding a signal ends gz as usual)
    opts.stop_requested = Some(|| crate::interrupt::requested().is_some());

    let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>5} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let progress = |p: gz_preprocess::Progress| {
        if bar.prefix() != p.split {
            bar.reset();
            bar.set_prefix(p.split);
        }
        bar.set_length(p.total);
        bar.set_position(p.done);
    };
    // --verify: a cache that exists but fails to open or to match its checksums is rebuilt
    // (moved aside and removed first, so no reader takes the damaged one for whole)
    let damaged = |dir: &Path, e: &dyn std::fmt::Display| -> anyhow::Result<()> {
        refuse_foreign(dir, &format!("is damaged ({e})"))?;
        eprintln!("warning: the cache {} is damaged ({e}); rebuilding it", dir.display());
        remove_cache(dir)
    };
    // a run with the stop handler in place; a stop ends gz with 128 + the signal, as a shell
    // reports a process the signal ended (an `ExitCode` error: the message is printed here)
    let run = |opts: &RunOptions| -> anyhow::Result<Result<gz_preprocess::RunSummary, gz_preprocess::PrepError>> {
        crate::interrupt::install_for_prep();
        let result = gz_preprocess::run_with(opts, &cfg, &progress);
        crate::interrupt::restore_default();
        let Some(sig) = crate::interrupt::requested() else {
            return Ok(result);
        };
        bar.finish_and_clear();
        match &result {
            Err(e @ gz_preprocess::PrepError::Interrupted { .. }) => eprintln!("gz prep: {e}"),
            // the signal came after the last images were decoded: the cache is whole
            Ok(s) => eprintln!(
                "gz prep: stopped; the signal came after the last images, and the complete cache is kept: {}",
                s.cache_dir.display()
            ),
            Err(e) => eprintln!("gz prep: stopped: {e}"),
        }
        Err(crate::ExitCode(128 + sig).into())
    };
    let result = match run(&opts)? {
        Err(gz_preprocess::PrepError::DamagedCache { dir, source }) if args.verify => {
            damaged(&dir, &source)?;
            run(&opts)?
        }
        // an input the cache left out as unreadable can be read now: prepared again with it
        Err(gz_preprocess::PrepError::StaleCache { dir, path, reason }) => {
            let why = format!(
                "left out {} as unreadable ({reason}), and it can be read now",
                super::shown(&path)
            );
            if let Err(e) = refuse_foreign(&dir, &why) {
                // a whole cache, short of that image: used as it is, not failed (a script's
                // `gz prep && gz train` went on before the image became readable)
                eprintln!("warning: {e:#}; the cache is used as it is");
                opts.keep_stale = true;
                run(&opts)?
            } else {
                eprintln!("warning: the cache {} {why}; rebuilding the cache", dir.display());
                remove_cache(&dir)?;
                run(&opts)?
            }
        }
        r => r,
    };
    let mut summary = result
        .map_err(|e| {
            let in_cache = match &e {
                gz_preprocess::PrepError::Shard(_) => true,
                gz_preprocess::PrepError::Io { path, .. } => path.starts_with(&cache_root),
                _ => false,
            };
            let e = anyhow::Error::new(e);
            if in_cache && !default_hint.is_empty() {
                e.context(format!("writing the cache{default_hint}"))
            } else {
                e
            }
        })
        .with_context(|| format!("preprocessing {}", data.display()))?;
    let mut verified = None;
    if args.verify && summary.cache_hit {
        match gz_shards::Cache::open(&summary.cache_dir).and_then(|c| c.verify()) {
            Ok(n) => verified = Some(n),
            Err(e) => {
                damaged(&summary.cache_dir, &e)?;
                summary = run(&opts)?.with_context(|| format!("preprocessing {}", data.display()))?;
            }
        }
    }
    bar.finish_and_clear();

    for s in &summary.skipped {
        println!("skipped: {}: {}", super::shown(&s.path), s.reason);
    }
    if summary.cache_hit {
        println!(
            "cache hit: {} train + {} already preprocessed ({:.2} s, nothing decoded)",
            summary.train,
            super::count(summary.test, "test image"),
            summary.elapsed_s
        );
        // (compared with the cache's own: a cache built with the same value says nothing, nor
        // does a command that did not ask for one)
        let built_with = gz_shards::Cache::open(&summary.cache_dir)
            .ok()
            .and_then(|c| c.train().or(c.test()).map(|s| s.rows_per_shard()));
        if let (Some(asked), Some(built)) = (args.rows_per_shard, built_with) {
            if asked != built {
                eprintln!(
                    "note: --rows-per-shard {asked} is not applied to a cache that exists (its shards keep their size \
                     ({built}): the rows are the same); `gz cache remove` it first to rewrite it"
                );
            }
        }
    } else {
        let n = summary.train + summary.test + summary.skipped.len();
        println!(
            "preprocessed {} train + {} in {:.1} s ({:.0} images/s), config {} crop {} → {}×{} {:?}",
            summary.train,
            super::count(summary.test, "test image"),
            summary.elapsed_s,
            n as f64 / summary.elapsed_s.max(1e-9),
            summary.config_hash,
            cfg.crop,
            cfg.size,
            cfg.size,
            cfg.filter
        );
    }
    if !summary.skipped.is_empty() {
        println!(
            "summary: {} skipped (listed above)",
            super::count(summary.skipped.len(), "input")
        );
    }
    match verified {
        Some(n) => println!("verified: {n} files, all checksums match"),
        None if args.verify => verify(&summary.cache_dir)?,
        None => {}
    }
    println!("cache: {}", summary.cache_dir.display());
    if summary.train == 0 && data.join(gz_preprocess::dataset::SOLUTIONS_CSV).is_file() {
        eprintln!("note: the cache holds no training images: `gz train` has nothing to train on with it");
    }
    if !summary.cache_hit {
        note_superseded(&cache_root, &data, &summary.dataset_key);
    }
    if summary.greyscale > 0 {
        eprintln!(
            "warning: {}",
            greyscale_warning(summary.greyscale, summary.greyscale_example.as_deref())
        );
    }
    let test_dir = data.join(gz_preprocess::dataset::TEST_DIR);
    if !test_dir.exists() {
        // a training-only download is fine; the commands that need test images are told why
        // they have none, not left to find out
        eprintln!(
            "note: there is no {} folder: the cache has no test split, so `gz predict --cache`, `gz submit` and \
             `gz eval --split test` will have nothing to work on (put the test JPEGs there and run `gz prep` again \
             for them)",
            test_dir.display()
        );
    }
    if !summary.skipped.is_empty() {
        // not an error: a warning, and exit status 2 for scripts. The `skipped:` lines are on
        // standard output (with the summary): "listed above" was wrong when it was redirected
        eprintln!(
            "warning: {} skipped (listed on standard output as `skipped:` lines, and in the cache's \
             manifest.json); the cache holds the rest (exit status 2)",
            super::count(summary.skipped.len(), "input")
        );
        return Err(anyhow::Error::new(crate::ExitCode(2)));
    }
    Ok(())
}

/// Says that `n` images were greyscale JPEGs (`example` the first), once per run: they are
/// copied to the three colour channels, but the models learn from colour (`gz prep` and `gz
/// predict --images` share it).
pub(crate) fn greyscale_warning(n: usize, example: Option<&Path>) -> String {
    let (what, each, these) = if n == 1 {
        ("1 image is a greyscale JPEG".to_string(), "it was", "it")
    } else {
        (format!("{n} images are greyscale JPEGs"), "each was", "these")
    };
    format!(
        "{what} (one channel{}): {each} copied to the three colour channels, but the models are trained on \
         colour images, so their predictions for {these} can be far off",
        example.map_or_else(String::new, |p| format!(", e.g. {}", p.display()))
    )
}

/// Refuses to rebuild the cache `dir` (`why` it would be: "is damaged (…)") when it holds files
/// the cache writer did not write: a user's notes, a run trained into it, which rebuilding
/// deleted without a word (`gz cache prune` and `remove` keep such caches).
fn refuse_foreign(dir: &Path, why: &str) -> anyhow::Result<()> {
    let foreign = gz_shards::inventory::foreign_files(dir);
    if foreign.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = foreign.iter().take(5).map(String::as_str).collect();
    anyhow::bail!(
        "the cache {} {why}, but it also holds files the cache writer did not write ({}{}), which rebuilding it \
         would delete: move them out of it, then run gz prep again",
        dir.display(),
        shown.join(", "),
        if foreign.len() > shown.len() { ", …" } else { "" }
    )
}

/// Removes a cache directory (damaged, or out of date): renamed to a hidden sibling first (a reader then finds no cache
/// rather than a half-deleted one), then deleted.
fn remove_cache(dir: &Path) -> anyhow::Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let aside = dir.with_file_name(format!(".{name}.damaged-{}", std::process::id()));
    match std::fs::rename(dir, &aside) {
        Ok(()) => {}
        // another gz prep that found it so too moved it first (and rebuilds it, or has)
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("moving the cache {} aside", dir.display())),
    }
    std::fs::remove_dir_all(&aside).with_context(|| format!("removing {}", aside.display()))
}

/// The dataset's image folder (`images_training_rev1/` or `images_test_rev1/`) that `root`
/// lies in, if it lies in one (where it lands: folders not made yet count by their parents).
fn images_folder_holding(data: &Path, root: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(root).ok()?;
    // the longest existing ancestor, resolved
    let mut base = abs.as_path();
    let resolved = loop {
        if let Ok(r) = base.canonicalize() {
            break r;
        }
        base = base.parent()?;
    };
    [gz_preprocess::dataset::TRAIN_DIR, gz_preprocess::dataset::TEST_DIR]
        .iter()
        .filter_map(|d| data.join(d).canonicalize().ok())
        .find(|images| resolved.starts_with(images))
}

/// Names the caches of this dataset built before its files changed (a new build makes them
/// dead weight: no `gz prep` uses them again), with what `gz cache prune` frees.
fn note_superseded(cache_root: &Path, data: &Path, key: &str) {
    let Ok(abs) = data.canonicalize() else { return };
    let old = crate::cmd::cache::superseded(cache_root, &abs, key);
    if old.is_empty() {
        return;
    }
    let bytes: u64 = old.iter().map(|e| e.bytes).sum();
    eprintln!(
        "note: {} of this dataset built before its files changed ({}) will not be used for it again; \
         `gz cache prune --data {} --cache {}` removes {} (keep {} if a copy of the dataset as it was, in another \
         folder, uses {}: gz does not know of copies)",
        super::count(old.len(), "cache"),
        crate::cmd::cache::human_bytes(bytes),
        crate::cmd::shell_path(data),
        crate::cmd::shell_path(cache_root),
        if old.len() == 1 { "it" } else { "them" },
        if old.len() == 1 { "it" } else { "them" },
        if old.len() == 1 { "it" } else { "them" }
    );
}

fn verify(dir: &Path) -> anyhow::Result<()> {
    // a cache root (the folder caches are written in) named for a cache: its caches are named
    if !dir.join(gz_shards::MANIFEST_FILE).exists() {
        let caches: Vec<PathBuf> = gz_shards::inventory::scan_root(dir)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| matches!(e.state, gz_shards::inventory::EntryState::Complete(_)))
            .map(|e| e.path)
            .collect();
        if let Some(first) = caches.first() {
            anyhow::bail!(
                "{} is a cache root holding {}, not a cache: pass one of them (e.g. --cache {}; `gz cache list {}` \
                 lists them)",
                dir.display(),
                super::count(caches.len(), "cache"),
                first.display(),
                dir.display()
            );
        }
    }
    let cache = gz_shards::Cache::open(dir).with_context(|| format!("opening cache {}", dir.display()))?;
    let n = cache
        .verify()
        .with_context(|| format!("verifying cache {}", dir.display()))?;
    println!("verified: {n} files, all checksums match");
    Ok(())
}

/// `<DATA>/../cache` (after resolving DATA, so `--data .` works).
fn default_cache_root(data: &Path) -> anyhow::Result<PathBuf> {
    let abs = data
        .canonicalize()
        .with_context(|| format!("{}: cannot resolve data directory", data.display()))?;
    Ok(abs.parent().unwrap_or(&abs).join("cache"))
}
